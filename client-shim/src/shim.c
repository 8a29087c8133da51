/*
 * libtrackd. Log calls encode straight into `pending` under one mutex and
 * return; consecutive points of one run share a many-points frame, so the
 * steady-state cost of a metric is a lock, a few stores and an unlock. A
 * sender thread owns the socket: it lets events accumulate for linger_ms,
 * swaps the buffer out, writes it, and reads the agent's flushed and error
 * frames. Producers wake it through an eventfd only when it sleeps idle, so
 * a busy training loop makes no system calls for logging at all.
 */
#define _GNU_SOURCE /* memfd_create, CLOCK_REALTIME_COARSE */
#include "trackd.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <dirent.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "trackd_proto.h"
#include "util.h"

#define DEFAULT_BUFFER (16u * 1024u * 1024u)
#define SEND_THRESHOLD (256u * 1024u) /* send at once above this */
#define MAX_POINTS_PER_FRAME 8192
#define DEFAULT_MAX_FRAME (1024u * 1024u) /* until the agent's welcome says otherwise */
#define ERROR_QUEUE 256
#define ARTIFACT_COPY_MAX (1024 * 1024) /* copied at the call; larger files go as they are */
#define RECONNECT_MIN_MS 50
#define RECONNECT_MAX_MS 2000
/*
 * After sending, the sender keeps looking for new events every linger_ms for
 * this long before it sleeps until woken: a training loop that logs every few
 * milliseconds then never pays for a wake-up system call in its logging calls.
 */
#define WARM_IDLE_MS 1000
#define CLOSE_SEND_MS 2000
#define MAX_ARTIFACT_FDS 256 /* files handed over and not yet acknowledged */
#define MAX_ARTIFACT_DEPTH 64

enum io_state { IO_DISCONNECTED, IO_CONNECTED };

/*
 * A client used in a process forked from the one that opened it: the sender thread does
 * not exist there, and the socket belongs to the parent. Calls return -ECHILD.
 */
#define CHECK_USABLE(c)                                                                            \
    do {                                                                                           \
        if ((c) != NULL && (c)->forked)                                                            \
            return -ECHILD;                                                                        \
    } while (0)

struct trackd_client {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* space freed, barrier reached, sender stopped */
    pthread_t io;
    int wake_fd;
    char socket_path[108];
    char source_name[256];
    char source_type[16];
    char program[128];
    size_t limit;
    uint32_t max_frame; /* largest frame body the agent accepts */
    int overflow;
    int block_timeout_ms;
    int linger_ms;
    bool no_context_tags;

    /* Shared, under mu. */
    struct proto_buf pending;
    uint64_t pending_events;
    bool metrics_open;
    size_t metrics_off;
    char metrics_run[PROTO_RUN_ID_LEN];
    uint64_t next_seq;
    uint64_t flush_wanted; /* highest flush seq a caller waits for */
    uint64_t flushed;      /* highest flush seq the agent answered */
    uint64_t session;      /* random id naming this client across reconnects */
    size_t unacked_bytes;  /* sent frames the agent has not acknowledged (see unacked) */
    bool welcomed;         /* a welcome arrived on some connection */
    char backend_uri[1024];
    bool io_idle;
    bool threshold_woken; /* the sender was woken for a full buffer since the last swap */
    bool stop;
    struct trackd_counters ctr;
    struct trackd_error errs[ERROR_QUEUE];
    size_t err_head, err_count;

    /* Open files of ARTIFACT frames, by frame seq, until the agent acknowledges them. */
    struct fd_slot {
        uint64_t seq;
        int fd;
    } * fds;
    size_t nfds, capfds;

    bool forked;         /* set in a forked child; see CHECK_USABLE */
    trackd_client *next; /* all open clients, for the fork handler */

    /* Sender thread only. */
    struct proto_buf unacked; /* sent, not yet acknowledged: resent after a reconnect */
    uint64_t unacked_events;  /* events in unacked (an upper bound after partial acks) */
    uint64_t agent_acked;     /* highest seq the agent acknowledged */
    enum io_state state;
    int fd;
    struct proto_reader reader;
    struct proto_buf sendbuf;
    unsigned reconnect_failures; /* since the last connection; for util_backoff_ms */
    unsigned backoff_seed;       /* rand_r state for the backoff's jitter */
    bool ever_connected;
    int64_t last_send_ms; /* monotonic; see WARM_IDLE_MS */
};

const char *trackd_strerror(int rc)
{
    switch (rc) {
    case 0: return "success";
    case -EINVAL: return "invalid argument";
    case -ENOBUFS: return "buffer full: event dropped";
    case -ETIMEDOUT: return "timed out waiting for the agent";
    case -ENOMEM: return "out of memory";
    case -EMSGSIZE: return "event larger than the agent's frame limit";
    default: return rc < 0 ? proto_strerror(rc) : "unknown";
    }
}

static void deadline_after(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static void wake(struct trackd_client *c)
{
    uint64_t one = 1;
    ssize_t r = write(c->wake_fd, &one, sizeof one);
    (void)r; /* a full counter already means "wake up" */
}

/* 32 lower-case hex characters, as trackd_new_run_id() and MLflow make them. */
static bool run_id_ok(const char *run_id)
{
    if (run_id == NULL)
        return false;
    for (int i = 0; i < PROTO_RUN_ID_LEN; i++) {
        char ch = run_id[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f')))
            return false;
    }
    return run_id[PROTO_RUN_ID_LEN] == '\0';
}

static struct proto_str to_str(const char *s)
{
    return (struct proto_str){s ? s : "", s ? (uint32_t)strlen(s) : 0};
}

/* ---- buffer admission (caller holds mu) --------------------------------- */

/*
 * Makes room for need more bytes carrying events events under the overflow
 * policy. With mu held; TRACKD_BLOCK waits on cv (releasing mu) for the
 * sender to drain. A refusal counts every event of the call as dropped.
 */
static int admit(struct trackd_client *c, size_t need, uint64_t events, size_t unit)
{
    /* A frame the agent would refuse would cost the whole connection: refuse it here. */
    if (unit > c->max_frame)
        return -EMSGSIZE;
    if (c->pending.len + c->unacked_bytes + need <= c->limit)
        return 0;
    if (c->overflow == TRACKD_BLOCK) {
        struct timespec dl;
        deadline_after(&dl, c->block_timeout_ms);
        wake(c);
        while (c->pending.len + c->unacked_bytes + need > c->limit && !c->stop)
            if (pthread_cond_timedwait(&c->cv, &c->mu, &dl) == ETIMEDOUT)
                break;
        if (c->pending.len + c->unacked_bytes + need <= c->limit)
            return 0;
    }
    c->ctr.dropped += events;
    return -ENOBUFS;
}

/* After appending: count and wake an idle sender. Returns with mu released. */
static int appended(struct trackd_client *c, uint64_t events)
{
    c->pending_events += events;
    c->ctr.queued += events;
    /*
     * Wake the sender when it sleeps idle, or once when the buffer crosses the
     * send threshold; otherwise it picks the events up after linger_ms. Waking
     * on every call would cost a system call per event and cut reconnect
     * backoff short.
     */
    bool cross = !c->threshold_woken && c->pending.len >= SEND_THRESHOLD;
    bool do_wake = c->io_idle || cross;
    if (cross)
        c->threshold_woken = true;
    if (do_wake)
        c->io_idle = false;
    pthread_mutex_unlock(&c->mu);
    if (do_wake)
        wake(c);
    return 0;
}

/* Appends one non-metric frame built by fn. */
#define APPEND_FRAME(c, need, events, expr)                                                        \
    do {                                                                                           \
        pthread_mutex_lock(&(c)->mu);                                                              \
        int rc_ = admit((c), (need), (events), (need));                                            \
        if (rc_ == 0) {                                                                            \
            uint64_t seq = (c)->next_seq++;                                                        \
            (c)->metrics_open = false;                                                             \
            rc_ = (expr);                                                                          \
            if (rc_ != 0)                                                                          \
                rc_ = -ENOMEM;                                                                     \
        }                                                                                          \
        if (rc_ != 0) {                                                                            \
            pthread_mutex_unlock(&(c)->mu);                                                        \
            return rc_;                                                                            \
        }                                                                                          \
        return appended((c), (events));                                                            \
    } while (0)

/* ---- public logging calls ------------------------------------------------- */

int trackd_new_run_id(char out[TRACKD_RUN_ID_SIZE])
{
    uint8_t r[16];
    if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r)
        return -errno;
    r[6] = (uint8_t)((r[6] & 0x0f) | 0x40); /* version 4 */
    r[8] = (uint8_t)((r[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[2 * i] = hex[r[i] >> 4];
        out[2 * i + 1] = hex[r[i] & 15];
    }
    out[32] = '\0';
    return 0;
}

int trackd_create_experiment(trackd_client *c, const char *name)
{
    CHECK_USABLE(c);
    if (c == NULL || name == NULL)
        return -EINVAL;
    APPEND_FRAME(c, strlen(name) + 64, 1, proto_encode_experiment(&c->pending, seq, to_str(name)));
}

static size_t kvs_size(const struct trackd_kv *kv, size_t n)
{
    size_t s = 0;
    for (size_t i = 0; i < n; i++)
        s += strlen(kv[i].key ? kv[i].key : "") + strlen(kv[i].value ? kv[i].value : "") + 10;
    return s;
}

/* Converts caller kv pairs for the encoder; NULL keys are rejected. */
static int to_proto_kvs(const struct trackd_kv *in, size_t n, struct proto_kv **out)
{
    *out = NULL;
    if (n == 0)
        return 0;
    struct proto_kv *kv = malloc(n * sizeof *kv);
    if (kv == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
        if (in[i].key == NULL || in[i].value == NULL) {
            free(kv);
            return -EINVAL;
        }
        kv[i].key = to_str(in[i].key);
        kv[i].value = to_str(in[i].value);
    }
    *out = kv;
    return 0;
}

static int start_run(trackd_client *c, const char *run_id, const uint64_t *experiment_id,
                     const char *experiment, const char *run_name, int64_t start_time_ms,
                     const struct trackd_kv *tags, size_t ntags)
{
    CHECK_USABLE(c);
    if (c == NULL || !run_id_ok(run_id) || (ntags && tags == NULL))
        return -EINVAL;
    struct proto_kv *kv;
    int rc = to_proto_kvs(tags, ntags, &kv);
    if (rc != 0)
        return rc;
    if (start_time_ms == TRACKD_NOW)
        start_time_ms = util_clock_ms(CLOCK_REALTIME);
    struct proto_str exp = to_str(experiment ? experiment : "Default");
    struct proto_str name = to_str(run_name);
    size_t need = exp.len + name.len + kvs_size(tags, ntags) + 96;
    pthread_mutex_lock(&c->mu);
    rc = admit(c, need, 1, need);
    if (rc == 0) {
        c->metrics_open = false;
        rc =
            proto_encode_start_run(&c->pending, c->next_seq++, run_id, exp, run_name ? &name : NULL,
                                   start_time_ms, kv, ntags, experiment_id)
                ? -ENOMEM
                : 0;
    }
    free(kv);
    if (rc != 0) {
        pthread_mutex_unlock(&c->mu);
        return rc;
    }
    return appended(c, 1);
}

int trackd_start_run(trackd_client *c, const char *run_id, const char *experiment,
                     const char *run_name, int64_t start_time_ms, const struct trackd_kv *tags,
                     size_t ntags)
{
    return start_run(c, run_id, NULL, experiment, run_name, start_time_ms, tags, ntags);
}

int trackd_start_run_in(trackd_client *c, const char *run_id, int64_t experiment_id,
                        const char *experiment, const char *run_name, int64_t start_time_ms,
                        const struct trackd_kv *tags, size_t ntags)
{
    if (experiment_id < 0)
        return -EINVAL;
    uint64_t id = (uint64_t)experiment_id;
    return start_run(c, run_id, &id, experiment, run_name, start_time_ms, tags, ntags);
}

/* Adds one point to the open many-points frame of run_id, opening one if needed. */
static int add_point(struct trackd_client *c, const char *run_id, const struct proto_point *p)
{
    if (!c->metrics_open || memcmp(c->metrics_run, run_id, PROTO_RUN_ID_LEN) != 0 ||
        proto_metrics_count(&c->pending, c->metrics_off) >= MAX_POINTS_PER_FRAME ||
        c->pending.len - c->metrics_off > c->max_frame / 2) {
        if (proto_metrics_begin(&c->pending, c->next_seq++, run_id, &c->metrics_off) != 0)
            return -ENOMEM;
        memcpy(c->metrics_run, run_id, PROTO_RUN_ID_LEN);
        c->metrics_open = true;
    }
    return proto_metrics_add(&c->pending, c->metrics_off, p) ? -ENOMEM : 0;
}

/*
 * With mu held: whether run_id is the run of the open many-points frame, which
 * was checked when the frame was opened. A training loop logs point after
 * point for one run, so the 32-character check runs once per frame, not once
 * per point.
 */
static bool same_open_run(const struct trackd_client *c, const char *run_id)
{
    return c->metrics_open && strncmp(c->metrics_run, run_id, PROTO_RUN_ID_LEN) == 0 &&
           run_id[PROTO_RUN_ID_LEN] == '\0';
}

int trackd_log_metric(trackd_client *c, const char *run_id, const char *key, double value,
                      int64_t step, int64_t timestamp_ms)
{
    CHECK_USABLE(c);
    if (c == NULL || key == NULL || run_id == NULL)
        return -EINVAL;
    struct proto_point p = {
        to_str(key), value,
        timestamp_ms == TRACKD_NOW ? util_clock_ms(CLOCK_REALTIME) : timestamp_ms, step};
    pthread_mutex_lock(&c->mu);
    if (!same_open_run(c, run_id) && !run_id_ok(run_id)) {
        pthread_mutex_unlock(&c->mu);
        return -EINVAL;
    }
    int rc = admit(c, p.key.len + 96, 1, p.key.len + 96);
    if (rc == 0)
        rc = add_point(c, run_id, &p);
    if (rc != 0) {
        pthread_mutex_unlock(&c->mu);
        return rc;
    }
    return appended(c, 1);
}

int trackd_log_metrics(trackd_client *c, const char *run_id, const struct trackd_metric *m,
                       size_t n)
{
    CHECK_USABLE(c);
    if (c == NULL || !run_id_ok(run_id) || (n && m == NULL))
        return -EINVAL;
    /* Points are split across frames as they fill, so only one point must fit a frame. */
    size_t need = 96, largest = 0;
    for (size_t i = 0; i < n; i++) {
        if (m[i].key == NULL)
            return -EINVAL;
        size_t klen = strlen(m[i].key);
        need += klen + 32;
        if (klen > largest)
            largest = klen;
    }
    int64_t now = util_clock_ms(CLOCK_REALTIME);
    pthread_mutex_lock(&c->mu);
    int rc = admit(c, need, n, largest + 96);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        struct proto_point p = {to_str(m[i].key), m[i].value,
                                m[i].timestamp_ms == TRACKD_NOW ? now : m[i].timestamp_ms,
                                m[i].step};
        rc = add_point(c, run_id, &p);
    }
    if (rc != 0) {
        pthread_mutex_unlock(&c->mu);
        return rc;
    }
    return appended(c, n);
}

static int log_kvs(trackd_client *c, int kind, const char *run_id, const struct trackd_kv *in,
                   size_t n)
{
    if (c == NULL || !run_id_ok(run_id) || (n && in == NULL))
        return -EINVAL;
    struct proto_kv *kv;
    int rc = to_proto_kvs(in, n, &kv);
    if (rc != 0)
        return rc;
    size_t need = kvs_size(in, n) + 64;
    pthread_mutex_lock(&c->mu);
    rc = admit(c, need, n, need);
    if (rc == 0) {
        c->metrics_open = false;
        rc = proto_encode_kvs(&c->pending, c->next_seq++, kind, run_id, kv, n) ? -ENOMEM : 0;
    }
    free(kv);
    if (rc != 0) {
        pthread_mutex_unlock(&c->mu);
        return rc;
    }
    return appended(c, n);
}

int trackd_log_param(trackd_client *c, const char *run_id, const char *key, const char *value)
{
    CHECK_USABLE(c);
    struct trackd_kv kv = {key, value};
    return log_kvs(c, PROTO_PARAMS, run_id, &kv, 1);
}

int trackd_log_params(trackd_client *c, const char *run_id, const struct trackd_kv *params,
                      size_t n)
{
    CHECK_USABLE(c);
    return log_kvs(c, PROTO_PARAMS, run_id, params, n);
}

int trackd_set_tag(trackd_client *c, const char *run_id, const char *key, const char *value)
{
    CHECK_USABLE(c);
    struct trackd_kv kv = {key, value};
    return log_kvs(c, PROTO_TAGS, run_id, &kv, 1);
}

int trackd_set_tags(trackd_client *c, const char *run_id, const struct trackd_kv *tags, size_t n)
{
    CHECK_USABLE(c);
    return log_kvs(c, PROTO_TAGS, run_id, tags, n);
}

int trackd_create_experiment_at(trackd_client *c, const char *name, const char *artifact_location)
{
    CHECK_USABLE(c);
    if (c == NULL || name == NULL)
        return -EINVAL;
    struct proto_str loc = to_str(artifact_location);
    APPEND_FRAME(c, strlen(name) + loc.len + 64, 1,
                 proto_encode_experiment_at(&c->pending, seq, to_str(name),
                                            artifact_location ? &loc : NULL));
}

int trackd_delete_tag(trackd_client *c, const char *run_id, const char *key)
{
    CHECK_USABLE(c);
    if (c == NULL || key == NULL || !run_id_ok(run_id))
        return -EINVAL;
    APPEND_FRAME(c, strlen(key) + 64, 1,
                 proto_encode_delete_tag(&c->pending, seq, run_id, to_str(key)));
}

static uint64_t ts_ns(struct timespec t)
{
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static bool same_file_state(const struct stat *a, const struct stat *b)
{
    return a->st_size == b->st_size && ts_ns(a->st_mtim) == ts_ns(b->st_mtim);
}

/*
 * A copy of a small file (at most ARTIFACT_COPY_MAX bytes) in an anonymous memory file,
 * made at the call as MLflow copies at the call: the agent then takes bytes nobody can
 * change. Returns the copy's descriptor and its stat, or -errno (the caller falls back to
 * the file itself). A file that changes while being copied is copied again, up to 3 times.
 */
static int copy_small(int fd, struct stat *st)
{
    char buf[64 * 1024];
    for (int attempt = 0; attempt < 3; attempt++) {
        int mfd = memfd_create("trackd-artifact", MFD_CLOEXEC);
        if (mfd < 0)
            return -errno;
        off_t off = 0;
        int rc = 0;
        for (;;) {
            ssize_t n = pread(fd, buf, sizeof buf, off);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                rc = n < 0 ? -errno : 0;
                break;
            }
            if (write(mfd, buf, (size_t)n) != n) {
                rc = -(errno ? errno : EIO);
                break;
            }
            off += n;
        }
        struct stat after;
        if (rc == 0 && fstat(fd, &after) != 0)
            rc = -errno;
        if (rc == 0 && same_file_state(st, &after) && off == st->st_size && fstat(mfd, st) == 0)
            return mfd;
        close(mfd);
        if (rc != 0)
            return rc;
        *st = after; /* it changed under the copy: take it as it is now */
    }
    return -EAGAIN;
}

/*
 * File systems stamp writes with the coarse clock (one tick: 1-10 ms), so a file rewritten
 * within the tick of its last write keeps its times, and the agent's check could not tell.
 * When the file was written in the current tick, wait for the next tick (at most ~20 ms, and
 * only then): any later write then gets a newer time. The same reasoning as git's "racy git".
 */
static void wait_past_tick(const struct stat *st)
{
    uint64_t stamp = ts_ns(st->st_mtim);
    for (int i = 0; i < 20; i++) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME_COARSE, &now);
        if (ts_ns(now) > stamp)
            return;
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
}

int trackd_log_artifact(trackd_client *c, const char *run_id, const char *local_path,
                        const char *artifact_path)
{
    CHECK_USABLE(c);
    if (c == NULL || local_path == NULL || !run_id_ok(run_id))
        return -EINVAL;
    const char *base = strrchr(local_path, '/');
    base = base ? base + 1 : local_path;
    if (base[0] == '\0')
        return -EINVAL;
    char path[4096];
    size_t dl = artifact_path ? strlen(artifact_path) : 0;
    while (dl > 0 && artifact_path[dl - 1] == '/')
        dl--;
    int pl = dl ? snprintf(path, sizeof path, "%.*s/%s", (int)dl, artifact_path, base)
                : snprintf(path, sizeof path, "%s", base);
    if (pl < 0 || (size_t)pl >= sizeof path)
        return -ENAMETOOLONG;
    int fd = open(local_path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        return -errno;
    struct stat st;
    int rc = fstat(fd, &st) != 0    ? -errno
             : S_ISDIR(st.st_mode)  ? -EISDIR
             : !S_ISREG(st.st_mode) ? -EINVAL
                                    : 0;
    if (rc != 0) {
        close(fd);
        return rc;
    }
    bool copied = false;
    if (st.st_size <= ARTIFACT_COPY_MAX) {
        struct stat copy_st = st;
        int copy = copy_small(fd, &copy_st);
        if (copy >= 0) {
            close(fd);
            fd = copy;
            st = copy_st;
            copied = true;
        }
    }
    if (!copied)
        wait_past_tick(&st);
    size_t need = (size_t)pl + 96;
    pthread_mutex_lock(&c->mu);
    rc = admit(c, need, 1, need);
    if (rc == 0 && c->nfds == MAX_ARTIFACT_FDS) {
        c->ctr.dropped++;
        rc = -ENOBUFS;
    }
    if (rc == 0 && c->nfds == c->capfds) {
        size_t cap = c->capfds ? c->capfds * 2 : 8;
        struct fd_slot *f = realloc(c->fds, cap * sizeof *f);
        if (f == NULL)
            rc = -ENOMEM;
        else {
            c->fds = f;
            c->capfds = cap;
        }
    }
    if (rc == 0) {
        uint64_t seq = c->next_seq++;
        c->metrics_open = false;
        /* What the file is at the call: the agent refuses to store other bytes. */
        struct proto_file_seen seen = {(uint64_t)st.st_size, ts_ns(st.st_mtim)};
        if (proto_encode_artifact(&c->pending, seq, run_id, (struct proto_str){path, (uint32_t)pl},
                                  &seen) != 0)
            rc = -ENOMEM;
        else
            c->fds[c->nfds++] = (struct fd_slot){seq, fd};
    }
    if (rc != 0) {
        pthread_mutex_unlock(&c->mu);
        close(fd);
        return rc;
    }
    return appended(c, 1);
}

/* Walks dir (path relative to the top in rel), handing over each regular file. */
static int log_dir(trackd_client *c, const char *run_id, const char *dir, const char *rel,
                   int depth)
{
    if (depth > MAX_ARTIFACT_DEPTH)
        return -ELOOP;
    DIR *d = opendir(dir);
    if (d == NULL)
        return -errno;
    int count = 0, rc = 0;
    struct dirent *e;
    while (rc >= 0 && (e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        char path[4096], sub[4096];
        struct stat st;
        if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= sizeof path ||
            (size_t)snprintf(sub, sizeof sub, "%s%s%s", rel, rel[0] ? "/" : "", e->d_name) >=
                sizeof sub) {
            rc = -ENAMETOOLONG;
            break;
        }
        /* Like MLflow: files behind symlinks are logged, symlinked directories are not walked. */
        if (lstat(path, &st) != 0) {
            rc = -errno;
            break;
        }
        if (S_ISDIR(st.st_mode)) {
            rc = log_dir(c, run_id, path, sub, depth + 1);
            count += rc > 0 ? rc : 0;
        } else if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
            rc = trackd_log_artifact(c, run_id, path, rel);
            count += rc == 0;
        }
    }
    closedir(d);
    return rc < 0 ? rc : count;
}

int trackd_log_artifacts(trackd_client *c, const char *run_id, const char *local_dir,
                         const char *artifact_path)
{
    CHECK_USABLE(c);
    if (c == NULL || local_dir == NULL || !run_id_ok(run_id))
        return -EINVAL;
    char rel[4096];
    size_t dl = artifact_path ? strlen(artifact_path) : 0;
    while (dl > 0 && artifact_path[dl - 1] == '/')
        dl--;
    snprintf(rel, sizeof rel, "%.*s", (int)dl, dl ? artifact_path : "");
    return log_dir(c, run_id, local_dir, rel, 0);
}

int trackd_update_run(trackd_client *c, const char *run_id, const char *status, int64_t end_time_ms,
                      const char *run_name)
{
    CHECK_USABLE(c);
    if (c == NULL || !run_id_ok(run_id))
        return -EINVAL;
    if (end_time_ms == TRACKD_NOW)
        end_time_ms = util_clock_ms(CLOCK_REALTIME);
    struct proto_str st = to_str(status), name = to_str(run_name);
    APPEND_FRAME(c, st.len + name.len + 64, 1,
                 proto_encode_update_run(&c->pending, seq, run_id, status ? &st : NULL,
                                         end_time_ms == TRACKD_KEEP ? NULL : &end_time_ms,
                                         run_name ? &name : NULL));
}

int trackd_backend_uri(trackd_client *c, char *out, size_t len, int timeout_ms)
{
    CHECK_USABLE(c);
    if (c == NULL || out == NULL)
        return -EINVAL;
    struct timespec dl;
    deadline_after(&dl, timeout_ms < 0 ? 0 : timeout_ms);
    pthread_mutex_lock(&c->mu);
    while (!c->welcomed && !c->stop)
        if (pthread_cond_timedwait(&c->cv, &c->mu, &dl) == ETIMEDOUT)
            break;
    int rc = !c->welcomed ? -ETIMEDOUT : c->backend_uri[0] == '\0' ? -ENOENT : 0;
    if (rc == 0) {
        if (strlen(c->backend_uri) >= len)
            rc = -ERANGE;
        else
            snprintf(out, len, "%s", c->backend_uri);
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int trackd_end_run(trackd_client *c, const char *run_id, const char *status, int64_t end_time_ms)
{
    CHECK_USABLE(c);
    if (c == NULL || !run_id_ok(run_id))
        return -EINVAL;
    if (end_time_ms == TRACKD_NOW)
        end_time_ms = util_clock_ms(CLOCK_REALTIME);
    struct proto_str st = to_str(status ? status : "FINISHED");
    APPEND_FRAME(c, st.len + 64, 1,
                 proto_encode_end_run(&c->pending, seq, run_id, st, end_time_ms));
}

int trackd_flush(trackd_client *c, int timeout_ms)
{
    CHECK_USABLE(c);
    if (c == NULL)
        return -EINVAL;
    pthread_mutex_lock(&c->mu);
    uint64_t seq = c->next_seq++;
    c->metrics_open = false;
    /* The barrier frame is tiny and must not be dropped: it bypasses the bound. */
    if (proto_encode_empty(&c->pending, seq, PROTO_FLUSH) != 0) {
        pthread_mutex_unlock(&c->mu);
        return -ENOMEM;
    }
    if (seq > c->flush_wanted)
        c->flush_wanted = seq;
    c->io_idle = false;
    pthread_mutex_unlock(&c->mu);
    wake(c);

    pthread_mutex_lock(&c->mu);
    struct timespec dl;
    if (timeout_ms >= 0)
        deadline_after(&dl, timeout_ms);
    int rc = 0;
    while (c->flushed < seq && !c->stop) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&c->cv, &c->mu);
        } else if (pthread_cond_timedwait(&c->cv, &c->mu, &dl) == ETIMEDOUT) {
            rc = c->flushed >= seq ? 0 : -ETIMEDOUT;
            break;
        }
    }
    if (c->flushed < seq && rc == 0)
        rc = -ETIMEDOUT;
    pthread_mutex_unlock(&c->mu);
    return rc;
}

void trackd_get_counters(trackd_client *c, struct trackd_counters *out)
{
    if (c->forked) {
        *out = c->ctr; /* the parent's figures at the fork; nothing moves here */
        return;
    }
    pthread_mutex_lock(&c->mu);
    *out = c->ctr;
    out->buffered_bytes = c->pending.len;
    pthread_mutex_unlock(&c->mu);
}

int trackd_next_error(trackd_client *c, struct trackd_error *out)
{
    CHECK_USABLE(c);
    pthread_mutex_lock(&c->mu);
    int got = 0;
    if (c->err_count > 0) {
        *out = c->errs[c->err_head];
        c->err_head = (c->err_head + 1) % ERROR_QUEUE;
        c->err_count--;
        got = 1;
    }
    pthread_mutex_unlock(&c->mu);
    return got;
}

/* ---- sender thread ---------------------------------------------------------- */

static void disconnect(struct trackd_client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->state = IO_DISCONNECTED;
    proto_reader_free(&c->reader);
    pthread_mutex_lock(&c->mu);
    c->ctr.connected = 0;
    pthread_mutex_unlock(&c->mu);
}

static void handle_frame(struct trackd_client *c, const struct proto_header *h, const uint8_t *body)
{
    struct proto_msg m;
    if (proto_msg_decode(h, body, &m) != 0)
        return;
    pthread_mutex_lock(&c->mu);
    if (m.kind == PROTO_WELCOME) {
        if (m.u.welcome.max_frame >= 4096)
            c->max_frame = m.u.welcome.max_frame;
        snprintf(c->backend_uri, sizeof c->backend_uri, "%.*s", (int)m.u.welcome.backend_uri.len,
                 m.u.welcome.backend_uri.ptr);
        c->welcomed = true;
        pthread_cond_broadcast(&c->cv);
    } else if (m.kind == PROTO_ACK) {
        if (m.u.ack.acked_seq > c->agent_acked)
            c->agent_acked = m.u.ack.acked_seq;
    } else if (m.kind == PROTO_FLUSHED) {
        if (m.u.flushed.flush_seq > c->flushed)
            c->flushed = m.u.flushed.flush_seq;
        pthread_cond_broadcast(&c->cv);
    } else if (m.kind == PROTO_ERROR) {
        c->ctr.errors++;
        if (c->err_count == ERROR_QUEUE) {
            c->ctr.errors_lost++;
        } else {
            struct trackd_error *e = &c->errs[(c->err_head + c->err_count++) % ERROR_QUEUE];
            e->seq = m.u.error.about_seq;
            e->code = m.u.error.code;
            snprintf(e->message, sizeof e->message, "%.*s", (int)m.u.error.message.len,
                     m.u.error.message.ptr);
        }
    }
    pthread_mutex_unlock(&c->mu);
}

/* Reads what the agent sent; -1 when the connection is gone. */
static int read_input(struct trackd_client *c)
{
    for (;;) {
        uint8_t *p;
        size_t n;
        if (proto_reader_space(&c->reader, 65536, &p, &n) != 0)
            return -1;
        ssize_t got = read(c->fd, p, n);
        if (got == 0)
            return -1;
        if (got < 0)
            return errno == EAGAIN || errno == EINTR ? 0 : -1;
        proto_reader_commit(&c->reader, (size_t)got);
        struct proto_header h;
        const uint8_t *body;
        int rc;
        while ((rc = proto_reader_next(&c->reader, &h, &body)) == 1)
            handle_frame(c, &h, body);
        if (rc < 0)
            return -1;
    }
}

static void drain_wake(struct trackd_client *c)
{
    uint64_t v;
    ssize_t r = read(c->wake_fd, &v, sizeof v);
    (void)r;
}

/* Waits up to ms for the agent or a producer; reads replies. -1: connection lost. */
static int wait_events(struct trackd_client *c, int ms)
{
    struct pollfd p[2] = {{c->wake_fd, POLLIN, 0}, {c->fd, POLLIN, 0}};
    int n = poll(p, c->fd >= 0 ? 2 : 1, ms);
    if (n <= 0)
        return 0;
    if (p[0].revents & POLLIN)
        drain_wake(c);
    if (c->fd >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR)))
        return read_input(c);
    return 0;
}

/* Sends with pass_fd (>= 0) attached as SCM_RIGHTS to the first byte sent. */
static ssize_t send_fd(int sock, const uint8_t *buf, size_t len, int pass_fd)
{
    if (pass_fd < 0)
        return send(sock, buf, len, MSG_NOSIGNAL);
    union {
        char b[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct iovec iov = {(void *)buf, len};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.b;
    msg.msg_controllen = sizeof u.b;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &pass_fd, sizeof pass_fd);
    return sendmsg(sock, &msg, MSG_NOSIGNAL);
}

/*
 * Writes all of buf, reading replies meanwhile; gives up after limit_ms (< 0: never).
 * pass_fd (>= 0) travels with the first byte.
 */
static int write_all_fd(struct trackd_client *c, const uint8_t *buf, size_t len, int pass_fd,
                        int limit_ms)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    size_t off = 0;
    while (off < len) {
        ssize_t n = send_fd(c->fd, buf + off, len - off, off == 0 ? pass_fd : -1);
        if (n > 0) {
            off += (size_t)n;
            continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            return -1;
        struct pollfd p = {c->fd, POLLOUT | POLLIN, 0};
        poll(&p, 1, 100);
        if ((p.revents & POLLIN) && read_input(c) != 0)
            return -1;
        if (p.revents & (POLLERR | POLLHUP))
            return -1;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (limit_ms < 0) {
            /* A close while the agent is not reading must not wait for it forever. */
            pthread_mutex_lock(&c->mu);
            bool stopping = c->stop;
            pthread_mutex_unlock(&c->mu);
            if (stopping) {
                start = now;
                limit_ms = CLOSE_SEND_MS;
            }
        }
        if (limit_ms >= 0 &&
            (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000 > limit_ms)
            return -1;
    }
    return 0;
}

static int write_all(struct trackd_client *c, const uint8_t *buf, size_t len, int limit_ms)
{
    return write_all_fd(c, buf, len, -1, limit_ms);
}

static int fd_for_seq(struct trackd_client *c, uint64_t seq)
{
    int fd = -1;
    pthread_mutex_lock(&c->mu);
    for (size_t i = 0; i < c->nfds && fd < 0; i++)
        if (c->fds[i].seq == seq)
            fd = c->fds[i].fd;
    pthread_mutex_unlock(&c->mu);
    return fd;
}

/* Writes whole frames; each ARTIFACT frame goes with its file's descriptor. */
static int send_frames(struct trackd_client *c, const uint8_t *buf, size_t len, int limit_ms)
{
    size_t off = 0, start = 0;
    struct proto_header h;
    while (len - off >= PROTO_HEADER_LEN &&
           proto_header_decode(buf + off, PROTO_MAX_BODY_HARD, &h) == 0) {
        size_t flen = PROTO_HEADER_LEN + (size_t)h.body_len;
        if (h.kind == PROTO_ARTIFACT) {
            if (start < off && write_all(c, buf + start, off - start, limit_ms) != 0)
                return -1;
            if (write_all_fd(c, buf + off, flen, fd_for_seq(c, h.seq), limit_ms) != 0)
                return -1;
            start = off + flen;
        }
        off += flen;
    }
    return start < len ? write_all(c, buf + start, len - start, limit_ms) : 0;
}

/* Closes the files of acknowledged ARTIFACT frames (all of them: acked = UINT64_MAX). */
static void release_fds(struct trackd_client *c, uint64_t acked)
{
    size_t k = 0;
    for (size_t i = 0; i < c->nfds; i++) {
        if (c->fds[i].seq <= acked)
            close(c->fds[i].fd);
        else
            c->fds[k++] = c->fds[i];
    }
    c->nfds = k;
}

/* Connects and says hello; re-sends a barrier lost with the previous connection. */
static int try_connect(struct trackd_client *c)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, c->socket_path, sizeof sa.sun_path);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    c->fd = fd;
    proto_reader_init(&c->reader, PROTO_MAX_BODY_HARD);
    struct proto_buf hello;
    proto_buf_init(&hello, 0);
    pthread_mutex_lock(&c->mu);
    uint64_t seq = c->next_seq++;
    pthread_mutex_unlock(&c->mu);
    int rc = proto_encode_hello_ctx(&hello, seq, (uint32_t)getpid(), to_str(c->program),
                                    to_str(c->source_name), to_str(c->source_type),
                                    to_str("libtrackd " TRACKD_VERSION), !c->no_context_tags,
                                    c->session);
    if (rc == 0)
        rc = write_all(c, hello.data, hello.len, 1000);
    proto_buf_free(&hello);
    /*
     * Frames the previous agent connection never acknowledged go again, before anything
     * newer; the agent recognises the session and drops the ones it already has.
     */
    if (rc == 0 && c->unacked.len > 0)
        rc = send_frames(c, c->unacked.data, c->unacked.len, -1);
    /*
     * A barrier the old agent acknowledged but never answered would wait forever: ask again
     * with the same seq, after everything resent. Only then: a flush frame still waiting in
     * pending or unacked goes out in its place, behind the events it is a barrier for.
     */
    pthread_mutex_lock(&c->mu);
    uint64_t wanted =
        c->flush_wanted > c->flushed && c->agent_acked >= c->flush_wanted ? c->flush_wanted : 0;
    pthread_mutex_unlock(&c->mu);
    if (rc == 0 && wanted) {
        struct proto_buf again;
        proto_buf_init(&again, 0);
        rc = proto_encode_empty(&again, wanted, PROTO_FLUSH);
        if (rc == 0)
            rc = write_all(c, again.data, again.len, 1000);
        proto_buf_free(&again);
    }
    if (rc != 0) {
        disconnect(c);
        return -1;
    }
    c->state = IO_CONNECTED;
    pthread_mutex_lock(&c->mu);
    c->ctr.connected = 1;
    if (c->ever_connected)
        c->ctr.reconnects++;
    pthread_mutex_unlock(&c->mu);
    c->ever_connected = true;
    c->reconnect_failures = 0;
    return 0;
}

/*
 * Drops the frames the agent acknowledged from the front of unacked (frames are in seq
 * order there) and frees their share of the buffer bound. Sender thread, mu held.
 */
static void trim_unacked(struct trackd_client *c)
{
    size_t off = 0;
    while (c->unacked.len - off >= PROTO_HEADER_LEN) {
        struct proto_header h;
        if (proto_header_decode(c->unacked.data + off, PROTO_MAX_BODY_HARD, &h) != 0 ||
            h.seq > c->agent_acked)
            break;
        off += PROTO_HEADER_LEN + h.body_len;
    }
    if (c->nfds)
        release_fds(c, c->agent_acked);
    if (off > 0) {
        proto_buf_consume(&c->unacked, off);
        if (c->unacked.len == 0)
            c->unacked_events = 0;
        pthread_cond_broadcast(&c->cv);
    }
    c->unacked_bytes = c->unacked.len;
}

static void *io_main(void *arg)
{
    struct trackd_client *c = arg;
    bool lingered = false; /* the pending events already waited linger_ms */
    pthread_mutex_lock(&c->mu);
    for (;;) {
        trim_unacked(c);
        bool stopping = c->stop;
        if (c->state == IO_DISCONNECTED) {
            if (stopping)
                break;
            pthread_mutex_unlock(&c->mu);
            if (try_connect(c) != 0) {
                /* Jittered: the ranks of a job that lost the agent together do not all
                 * come back in the same millisecond. */
                wait_events(c, (int)util_backoff_ms(++c->reconnect_failures, RECONNECT_MIN_MS,
                                                    RECONNECT_MAX_MS,
                                                    (uint32_t)rand_r(&c->backoff_seed)));
            }
            pthread_mutex_lock(&c->mu);
            continue;
        }
        if (c->pending.len == 0) {
            if (stopping)
                break;
            /* Warm: producers do not wake us; we look again after linger_ms. */
            bool warm = util_clock_ms(CLOCK_MONOTONIC) - c->last_send_ms < WARM_IDLE_MS;
            c->io_idle = !warm;
            pthread_mutex_unlock(&c->mu);
            int rc = wait_events(c, warm ? c->linger_ms : -1);
            pthread_mutex_lock(&c->mu);
            c->io_idle = false;
            if (rc != 0) {
                pthread_mutex_unlock(&c->mu);
                disconnect(c);
                pthread_mutex_lock(&c->mu);
            }
            lingered = warm;
            continue;
        }
        bool urgent = stopping || c->flush_wanted > c->flushed || c->pending.len >= SEND_THRESHOLD;
        if (!urgent && !lingered) {
            /* Let a burst accumulate into one write. */
            pthread_mutex_unlock(&c->mu);
            int rc = wait_events(c, c->linger_ms);
            pthread_mutex_lock(&c->mu);
            if (rc != 0) {
                pthread_mutex_unlock(&c->mu);
                disconnect(c);
                pthread_mutex_lock(&c->mu);
                continue;
            }
        }
        lingered = false;
        c->last_send_ms = util_clock_ms(CLOCK_MONOTONIC);
        struct proto_buf tmp = c->sendbuf;
        c->sendbuf = c->pending;
        c->pending = tmp;
        c->pending.len = 0;
        uint64_t events = c->pending_events;

        c->pending_events = 0;
        c->threshold_woken = false;
        c->metrics_open = false;
        pthread_cond_broadcast(&c->cv);
        pthread_mutex_unlock(&c->mu);

        int rc = send_frames(c, c->sendbuf.data, c->sendbuf.len, stopping ? CLOSE_SEND_MS : -1);
        /* Sent or not, the frames wait in unacked until the agent confirms them. */
        int keep = proto_buf_reserve(&c->unacked, c->sendbuf.len);
        if (keep == 0) {
            memcpy(c->unacked.data + c->unacked.len, c->sendbuf.data, c->sendbuf.len);
            c->unacked.len += c->sendbuf.len;
            c->unacked_events += events;
        }
        c->sendbuf.len = 0;
        pthread_mutex_lock(&c->mu);
        if (keep != 0)
            c->ctr.lost += events;
        if (rc == 0)
            c->ctr.sent += events;
        trim_unacked(c);
        if (rc != 0) {
            pthread_mutex_unlock(&c->mu);
            disconnect(c);
            pthread_mutex_lock(&c->mu);
        }
    }
    /* Whatever could not be sent, or was never acknowledged, is lost: count it. */
    c->ctr.lost += c->pending_events + (c->unacked.len ? c->unacked_events : 0);
    c->pending_events = 0;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* ---- open / close ------------------------------------------------------------ */

/* Every open client, so that a forked child can let go of the parent's sockets. */
static pthread_mutex_t clients_mu = PTHREAD_MUTEX_INITIALIZER;
static trackd_client *clients;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void atfork_prepare(void)
{
    pthread_mutex_lock(&clients_mu);
}

static void atfork_parent(void)
{
    pthread_mutex_unlock(&clients_mu);
}

/*
 * In the child only the forking thread exists: the sender threads are gone and the sockets
 * are the parent's. Closing the child's copies lets the agent see the parent's connection
 * end when the parent does, and marks each client unusable here.
 */
static void atfork_child(void)
{
    for (trackd_client *c = clients; c; c = c->next) {
        c->forked = true;
        if (c->fd >= 0)
            close(c->fd);
        if (c->wake_fd >= 0)
            close(c->wake_fd);
        c->fd = c->wake_fd = -1;
    }
    pthread_mutex_unlock(&clients_mu);
}

static void atfork_register(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

static void registry_add(trackd_client *c)
{
    pthread_once(&atfork_once, atfork_register);
    pthread_mutex_lock(&clients_mu);
    c->next = clients;
    clients = c;
    pthread_mutex_unlock(&clients_mu);
}

static void registry_remove(trackd_client *c)
{
    pthread_mutex_lock(&clients_mu);
    for (trackd_client **p = &clients; *p; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            break;
        }
    }
    pthread_mutex_unlock(&clients_mu);
}

static void read_argv0(char *out, size_t n)
{
    out[0] = '\0';
    int fd = open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t got = read(fd, out, n - 1);
    close(fd);
    out[got > 0 ? (size_t)got : 0] = '\0';
}

int trackd_open(trackd_client **out, const struct trackd_options *opts)
{
    struct trackd_options o = {0};
    if (out == NULL)
        return -EINVAL;
    if (opts)
        o = *opts;
    const char *path = o.socket_path ? o.socket_path : getenv("TRACKD_SOCKET");
    if (path == NULL || path[0] == '\0')
        path = TRACKD_DEFAULT_SOCKET;
    struct trackd_client *c = calloc(1, sizeof *c);
    if (c == NULL)
        return -ENOMEM;
    if (strlen(path) >= sizeof c->socket_path) {
        free(c);
        return -ENAMETOOLONG;
    }
    snprintf(c->socket_path, sizeof c->socket_path, "%s", path);
    read_argv0(c->program, sizeof c->program);
    snprintf(c->source_name, sizeof c->source_name, "%s",
             o.source_name ? o.source_name : c->program);
    snprintf(c->source_type, sizeof c->source_type, "%s", o.source_type ? o.source_type : "LOCAL");
    c->limit = o.buffer_bytes ? o.buffer_bytes : DEFAULT_BUFFER;
    c->overflow = o.overflow;
    c->block_timeout_ms = o.block_timeout_ms > 0 ? o.block_timeout_ms : 1000;
    c->linger_ms = o.linger_ms > 0 ? o.linger_ms : 5;
    c->max_frame = DEFAULT_MAX_FRAME;
    c->no_context_tags = o.no_context_tags != 0;
    while (c->session == 0)
        if (getrandom(&c->session, sizeof c->session, 0) != (ssize_t)sizeof c->session)
            c->session = (uint64_t)util_clock_ms(CLOCK_REALTIME) ^ ((uint64_t)getpid() << 32);
    proto_buf_init(&c->unacked, c->limit + 2 * (size_t)PROTO_MAX_BODY_HARD);
    c->next_seq = 1;
    c->fd = -1;
    c->backoff_seed = (unsigned)(c->session ^ c->session >> 32);
    /* Encoding never fails on the bound: admit() enforces it with slack to spare. */
    proto_buf_init(&c->pending, c->limit + 2 * (size_t)PROTO_MAX_BODY_HARD);
    proto_buf_init(&c->sendbuf, c->limit + 2 * (size_t)PROTO_MAX_BODY_HARD);
    c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    if (c->wake_fd < 0 || pthread_mutex_init(&c->mu, NULL) != 0 ||
        pthread_cond_init(&c->cv, &ca) != 0) {
        int e = errno;
        if (c->wake_fd >= 0)
            close(c->wake_fd);
        free(c);
        return -(e ? e : ENOMEM);
    }
    pthread_condattr_destroy(&ca);
    if (pthread_create(&c->io, NULL, io_main, c) != 0) {
        close(c->wake_fd);
        pthread_mutex_destroy(&c->mu);
        pthread_cond_destroy(&c->cv);
        free(c);
        return -EAGAIN;
    }
    registry_add(c);
    *out = c;
    return 0;
}

void trackd_close(trackd_client *c, int timeout_ms)
{
    if (c == NULL)
        return;
    registry_remove(c);
    if (c->forked) {
        /* No sender thread to join, and its locks may have been held at the fork. */
        proto_reader_free(&c->reader);
        proto_buf_free(&c->pending);
        proto_buf_free(&c->sendbuf);
        proto_buf_free(&c->unacked);
        release_fds(c, UINT64_MAX);
        free(c->fds);
        free(c);
        return;
    }
    if (timeout_ms >= 0)
        trackd_flush(c, timeout_ms);
    pthread_mutex_lock(&c->mu);
    c->stop = true;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    wake(c);
    pthread_join(c->io, NULL);
    if (c->fd >= 0)
        close(c->fd);
    proto_reader_free(&c->reader);
    proto_buf_free(&c->pending);
    proto_buf_free(&c->sendbuf);
    proto_buf_free(&c->unacked);
    release_fds(c, UINT64_MAX);
    free(c->fds);
    close(c->wake_fd);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    free(c);
}
