/*
 * libtrackd's logging calls: the public API but for open and close (client.c). They encode
 * straight into `pending` under one mutex and return; consecutive points of one run share a
 * many-points frame, so the steady-state cost of a metric is a lock, a few stores and an
 * unlock. The sender thread (sender.c) drains `pending`; producers wake it through an eventfd
 * only when it sleeps idle, so a busy training loop makes no system calls for logging at all.
 */
#define _GNU_SOURCE /* memfd_create, CLOCK_REALTIME_COARSE */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "shim_internal.h"
#include "util.h"

#define MAX_POINTS_PER_FRAME 8192
#define ARTIFACT_COPY_MAX (1024 * 1024) /* copied at the call; larger files go as they are */
#define MAX_ARTIFACT_FDS 256            /* files handed over and not yet acknowledged */
#define MAX_ARTIFACT_DEPTH 64

/*
 * A client used in a process forked from the one that opened it: the sender thread does
 * not exist there, and the socket belongs to the parent. Calls return -ECHILD.
 */
#define CHECK_USABLE(c)                                                                            \
    do {                                                                                           \
        if ((c) != NULL && (c)->forked)                                                            \
            return -ECHILD;                                                                        \
    } while (0)

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
