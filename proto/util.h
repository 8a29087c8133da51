/*
 * Small helpers the agent and the shim share (both build proto/): byte order, clocks, files,
 * the error sentence and retry backoff. Header only, static inline.
 */
#ifndef TRACKD_UTIL_H
#define TRACKD_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- byte order: big-endian for the wire and COPY, little-endian for journal segments ---- */

static inline void util_put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void util_put_be32(uint8_t *p, uint32_t v)
{
    util_put_be16(p, (uint16_t)(v >> 16));
    util_put_be16(p + 2, (uint16_t)v);
}

static inline void util_put_be64(uint8_t *p, uint64_t v)
{
    util_put_be32(p, (uint32_t)(v >> 32));
    util_put_be32(p + 4, (uint32_t)v);
}

static inline uint16_t util_get_be16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static inline uint32_t util_get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t util_get_be64(const uint8_t *p)
{
    return (uint64_t)util_get_be32(p) << 32 | util_get_be32(p + 4);
}

static inline void util_put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> 8 * i);
}

static inline void util_put_le64(uint8_t *p, uint64_t v)
{
    util_put_le32(p, (uint32_t)v);
    util_put_le32(p + 4, (uint32_t)(v >> 32));
}

static inline uint32_t util_get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t util_get_le64(const uint8_t *p)
{
    return (uint64_t)util_get_le32(p) | (uint64_t)util_get_le32(p + 4) << 32;
}

/* ---- arrays ---------------------------------------------------------------------------- */

/*
 * Room for one more element in a growing array: v (NULL at first) holds n of *cap elements of
 * elem bytes. Returns v while there is room, else the array reallocated at twice the capacity
 * (first, the first time) with *cap updated, or NULL when out of memory (v and *cap as they
 * were).
 */
static inline void *util_grow(void *v, size_t *cap, size_t n, size_t elem, size_t first)
{
    if (n < *cap)
        return v;
    size_t c = *cap ? *cap * 2 : first;
    if (c > SIZE_MAX / elem)
        return NULL;
    void *nv = realloc(v, c * elem);
    if (nv != NULL)
        *cap = c;
    return nv;
}

/* ---- clocks ---------------------------------------------------------------------------- */

/* Milliseconds of clock id: CLOCK_REALTIME for epoch timestamps (MLflow's), CLOCK_MONOTONIC
 * for intervals and deadlines. */
static inline int64_t util_clock_ms(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Microseconds of clock id. */
static inline int64_t util_clock_us(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* The current UTC time in ISO 8601 with milliseconds, "2026-12-01T05:40:12.146Z": log lines and
 * dead letters. */
#define UTIL_ISO_TIME_LEN 32
static inline void util_iso_time_now(char out[UTIL_ISO_TIME_LEN])
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(out, UTIL_ISO_TIME_LEN - 6, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, UTIL_ISO_TIME_LEN - n, ".%03dZ", (int)(ts.tv_nsec / 1000000));
}

/* ---- files ----------------------------------------------------------------------------- */

/*
 * mkdir -p: every missing directory of path, those above it with mode parents and path itself
 * with mode leaf; existing ones are left as they are. Returns 0 or -errno (-ENAMETOOLONG past
 * 4095 bytes).
 */
static inline int util_mkdir_p(const char *path, mode_t parents, mode_t leaf)
{
    char buf[4096];
    size_t n = (size_t)snprintf(buf, sizeof buf, "%s", path);
    if (n >= sizeof buf)
        return -ENAMETOOLONG;
    while (n > 1 && buf[n - 1] == '/')
        buf[--n] = '\0'; /* "/x/journal/" is "/x/journal": the leaf's mode goes to it */
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, parents) != 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    return mkdir(buf, leaf) != 0 && errno != EEXIST ? -errno : 0;
}

/* Writes all n bytes (again after EINTR or a short write). 0 or -errno (-EIO: wrote nothing). */
static inline int util_write_full(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return w < 0 ? -errno : -EIO;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* fsyncs directory dir, so that names created or renamed in it are durable. 0 or -errno. */
static inline int util_fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = fsync(fd) == 0 ? 0 : -errno;
    close(fd);
    return rc;
}

/* ---- errors ---------------------------------------------------------------------------- */

/*
 * The project's error convention: 0 or a negative errno, with a sentence in a caller's buffer
 * where there is more to say. Sets msg to "<what>: <strerror(-rc)>" and returns rc; what is cut
 * at UTIL_ERROR_WHAT_MAX bytes (it often names a long path) so the reason always fits.
 */
#define UTIL_ERROR_WHAT_MAX 300
__attribute__((format(printf, 4, 5))) static inline int util_errorf(char *msg, size_t msglen,
                                                                    int rc, const char *fmt, ...)
{
    char what[UTIL_ERROR_WHAT_MAX + 1];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    snprintf(msg, msglen, "%s: %s", what, strerror(-rc));
    return rc;
}

/* ---- backoff --------------------------------------------------------------------------- */

/*
 * The wait before the next attempt, in ms: min_ms doubled for each failure before the last
 * (failures = 0 or 1 gives min_ms), at most max_ms; then a point in [d/2, d] picked by rnd
 * ("equal jitter"), so that many clients of one server (a fleet of agents, the ranks of a
 * job) do not retry in step. rnd: any uniformly random value (rand() on the agent's loop,
 * rand_r() in the shim's sender thread).
 */
static inline uint64_t util_backoff_ms(unsigned failures, uint64_t min_ms, uint64_t max_ms,
                                       uint32_t rnd)
{
    uint64_t ms = min_ms;
    for (unsigned i = 1; i < failures && ms < max_ms; i++)
        ms *= 2;
    if (ms > max_ms)
        ms = max_ms;
    return ms / 2 + rnd % (ms / 2 + 1);
}

#endif
