/*
 * JSON lines for rejected events. A line is built in memory and written with one write()
 * on an O_APPEND descriptor: rejections are rare and the write lands in the page cache, so
 * it stays on the loop; nothing here fsyncs.
 */
#include "deadletter.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "stats.h"
#include "util.h"

#define LINE_MAX_BYTES 16384

int deadletter_open(struct deadletter *d, const char *journal_dir)
{
    snprintf(d->path, sizeof d->path, "%s/dead-letter.jsonl", journal_dir);
    d->fd = open(d->path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (d->fd < 0) {
        int e = errno;
        log_error("[deadletter] cannot open %s: %s; rejected events are only logged", d->path,
                  strerror(e));
        return -e;
    }
    return 0;
}

void deadletter_close(struct deadletter *d)
{
    if (d->fd >= 0)
        close(d->fd);
    d->fd = -1;
}

/* A bounded line under construction; overlong content is cut, never overflowed. */
struct line {
    char buf[LINE_MAX_BYTES];
    size_t len;
};

static void put(struct line *l, const char *s, size_t n)
{
    if (n > sizeof l->buf - 2 - l->len)
        n = sizeof l->buf - 2 - l->len;
    memcpy(l->buf + l->len, s, n);
    l->len += n;
}

static void putz(struct line *l, const char *s)
{
    put(l, s, strlen(s));
}

/* A JSON string: quotes, backslashes and control characters escaped; UTF-8 kept. */
static void put_json(struct line *l, const char *s, size_t n)
{
    put(l, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        char esc[8];
        if (ch == '"' || ch == '\\') {
            esc[0] = '\\';
            esc[1] = (char)ch;
            put(l, esc, 2);
        } else if (ch < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", ch);
            put(l, esc, 6);
        } else {
            put(l, (const char *)&ch, 1);
        }
    }
    put(l, "\"", 1);
}

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static void
put_num(struct line *l, const char *fmt, ...)
{
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    put(l, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static void begin(struct line *l, uint32_t code, const char *message)
{
    char t[UTIL_ISO_TIME_LEN];
    util_iso_time_now(t);
    l->len = 0;
    putz(l, "{\"time\":");
    put_json(l, t, strlen(t));
    put_num(l, ",\"code\":%" PRIu32 ",\"reason\":", code);
    put_json(l, message, strlen(message));
}

static void finish(struct deadletter *d, struct line *l)
{
    put(l, "}\n", 2);
    l->buf[l->len - 1] = '\n'; /* a cut line still ends as a line */
    stats.dead_lettered++;
    if (d->fd < 0)
        return;
    if (write(d->fd, l->buf, l->len) != (ssize_t)l->len)
        log_limited(LOG_ERROR, "[deadletter] write to %s failed: %s", d->path, strerror(errno));
}

void deadletter_event(struct deadletter *d, const struct batch *b, const struct ev *ev,
                      uint32_t code, const char *sqlstate, const char *message)
{
    struct line l;
    begin(&l, code, message);
    putz(&l, ",\"sqlstate\":");
    put_json(&l, sqlstate, strlen(sqlstate));
    put_num(&l, ",\"client\":{\"conn\":%" PRIu32 ",\"seq\":%" PRIu64 "},\"event\":{\"kind\":",
            ev_frame(b, ev)->conn_id, ev_frame(b, ev)->seq);
    put_json(&l, ev_kind_name(ev->kind), strlen(ev_kind_name(ev->kind)));
    if (ev->kind != EV_EXPERIMENT) {
        putz(&l, ",\"run_id\":");
        put_json(&l, ev_run(b, ev), PROTO_RUN_ID_LEN);
    }
    if (ev->kind != EV_END_RUN) {
        putz(&l, ev->kind == EV_EXPERIMENT || ev->kind == EV_START_RUN ? ",\"experiment\":"
                                                                       : ",\"key\":");
        put_json(&l, batch_sptr(b, ev->str[0]), ev->str[0].len); /* the name or key */
    }
    if (ev->kind == EV_METRIC)
        put_num(&l, ",\"value\":%.17g,\"is_nan\":%s,\"timestamp\":%" PRId64 ",\"step\":%" PRId64,
                ev->point.value, ev->is_nan ? "true" : "false", ev->point.ts, ev->point.step);
    if (ev->kind == EV_PARAM || ev->kind == EV_TAG || ev->kind == EV_START_RUN) {
        putz(&l, ev->kind == EV_START_RUN ? ",\"run_name\":" : ",\"value\":");
        put_json(&l, batch_sptr(b, ev->str[1]), ev->str[1].len); /* the run name or value */
    }
    put(&l, "}", 1);
    finish(d, &l);
}

void deadletter_frame(struct deadletter *d, uint32_t conn_id, uint64_t seq, uint32_t code,
                      const char *message)
{
    struct line l;
    begin(&l, code, message);
    put_num(&l, ",\"client\":{\"conn\":%" PRIu32 ",\"seq\":%" PRIu64 "}", conn_id, seq);
    finish(d, &l);
}
