/*
 * Batch cutting, the pending-memory bound and flush barriers, around events.c, which turns
 * each message into validated events in the open batch.
 */
#include "ingest.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "log.h"
#include "stats.h"
#include "util.h"
#include "writer.h"

#define MAX_WAITERS 65536

static void age_cb(uv_timer_t *t);

int ingest_init(struct ingest *in, uv_loop_t *loop, const struct trackd_config *cfg,
                struct writer *writer, const struct ingest_cbs *cbs, void *ctx)
{
    memset(in, 0, sizeof *in);
    in->loop = loop;
    in->cfg = cfg;
    in->writer = writer;
    in->cbs = *cbs;
    in->ctx = ctx;
    in->next_serial = 1;
    uv_timer_init(loop, &in->age_timer);
    in->age_timer.data = in;
    return 0;
}

size_t ingest_pending_bytes(const struct ingest *in)
{
    return in->queued_bytes + (in->open ? batch_bytes(in->open) : 0);
}

bool ingest_drained(const struct ingest *in)
{
    return (in->open == NULL || in->open->n == 0) && writer_idle(in->writer);
}

static void update_gauges(struct ingest *in)
{
    stats.queue_bytes = ingest_pending_bytes(in);
    if (stats.queue_bytes > stats.queue_bytes_peak)
        stats.queue_bytes_peak = stats.queue_bytes;
    stats.queue_events = in->next_serial - 1 - in->done_serial;
}

static void check_pressure(struct ingest *in)
{
    size_t pending = ingest_pending_bytes(in);
    update_gauges(in);
    if (!in->paused && pending >= in->cfg->max_pending_bytes) {
        in->paused = true;
        stats.backpressure_pauses++;
        log_limited(LOG_WARN,
                    "[ingest] %zu bytes pending (limit %llu): pausing clients until the database "
                    "catches up",
                    pending, (unsigned long long)in->cfg->max_pending_bytes);
        in->cbs.pause(in->ctx, true);
    } else if (in->paused && pending < in->cfg->max_pending_bytes / 2) {
        in->paused = false;
        log_info("[ingest] %zu bytes pending: resuming clients", pending);
        in->cbs.pause(in->ctx, false);
    }
}

void ingest_cut(struct ingest *in)
{
    uv_timer_stop(&in->age_timer);
    in->age_due = false;
    struct batch *b = in->open;
    if (b == NULL || b->n == 0)
        return;
    in->open = NULL;
    in->queued_bytes += batch_bytes(b);
    writer_submit(in->writer, b);
}

static void age_cb(uv_timer_t *t)
{
    struct ingest *in = t->data;
    /* While the writer is busy, let the batch grow: larger transactions drain faster. */
    if (writer_idle(in->writer))
        ingest_cut(in);
    else
        in->age_due = true;
}

/* True when every event up to serial is finished and no upload at or below it runs. */
static bool barrier_passed(const struct ingest *in, uint64_t serial)
{
    if (serial > in->done_serial)
        return false;
    for (size_t i = 0; i < in->nholds; i++)
        if (in->holds[i] <= serial)
            return false;
    return true;
}

static void answer_waiters(struct ingest *in)
{
    size_t keep = 0;
    for (size_t i = 0; i < in->nwaiters; i++) {
        struct flush_waiter *fw = &in->waiters[i];
        if (barrier_passed(in, fw->serial))
            in->cbs.flushed(in->ctx, fw->conn_id, fw->flush_seq);
        else
            in->waiters[keep++] = *fw;
    }
    in->nwaiters = keep;
}

int ingest_hold(struct ingest *in, uint64_t serial)
{
    uint64_t *h = util_grow(in->holds, &in->capholds, in->nholds, sizeof *h, 16);
    if (h == NULL)
        return -ENOMEM;
    in->holds = h;
    in->holds[in->nholds++] = serial;
    return 0;
}

void ingest_unhold(struct ingest *in, uint64_t serial)
{
    for (size_t i = 0; i < in->nholds; i++) {
        if (in->holds[i] == serial) {
            in->holds[i] = in->holds[--in->nholds];
            answer_waiters(in);
            return;
        }
    }
}

void ingest_batch_done(struct ingest *in, struct batch *b)
{
    size_t bytes = batch_bytes(b);
    in->queued_bytes -= bytes < in->queued_bytes ? bytes : in->queued_bytes;
    if (b->n > 0 && b->evs[b->n - 1].serial > in->done_serial)
        in->done_serial = b->evs[b->n - 1].serial;
    /* Events arrive in journal order, so the last one's record bounds what is finished. */
    if (b->n > 0 && b->evs[b->n - 1].lsn && in->cbs.released)
        in->cbs.released(in->ctx, b->evs[b->n - 1].lsn);
    batch_free(b);
    free(b);
    answer_waiters(in);
    if (writer_idle(in->writer) && (in->age_due || in->nwaiters > 0))
        ingest_cut(in);
    check_pressure(in);
}

int ingest_flush(struct ingest *in, uint32_t conn_id, uint64_t flush_seq)
{
    stats.flushes++;
    uint64_t target = in->next_serial - 1;
    if (barrier_passed(in, target)) {
        in->cbs.flushed(in->ctx, conn_id, flush_seq);
        return 0;
    }
    if (in->nwaiters == in->capwaiters) {
        size_t cap = in->capwaiters ? in->capwaiters * 2 : 16;
        struct flush_waiter *w = cap <= MAX_WAITERS ? realloc(in->waiters, cap * sizeof *w) : NULL;
        if (w == NULL) {
            in->cbs.error(in->ctx, conn_id, flush_seq, PROTO_ERR_PROTOCOL,
                          "too many flush requests outstanding in the agent");
            return -ENOBUFS;
        }
        in->waiters = w;
        in->capwaiters = cap;
    }
    in->waiters[in->nwaiters++] = (struct flush_waiter){conn_id, flush_seq, target};
    ingest_cut(in);
    return 0;
}

void ingest_forget_conn(struct ingest *in, uint32_t conn_id)
{
    size_t keep = 0;
    for (size_t i = 0; i < in->nwaiters; i++)
        if (in->waiters[i].conn_id != conn_id)
            in->waiters[keep++] = in->waiters[i];
    in->nwaiters = keep;
}

void ingest_close(struct ingest *in)
{
    free(in->holds);
    in->holds = NULL;
    in->nholds = in->capholds = 0;
    if (in->open) {
        batch_free(in->open);
        free(in->open);
        in->open = NULL;
    }
    free(in->waiters);
    in->waiters = NULL;
    in->nwaiters = in->capwaiters = 0;
    uv_timer_stop(&in->age_timer);
    uv_close((uv_handle_t *)&in->age_timer, NULL);
}

static struct batch *open_batch(struct ingest *in)
{
    if (in->open == NULL) {
        in->open = malloc(sizeof *in->open);
        if (in->open == NULL)
            return NULL;
        batch_init(in->open);
    }
    if (in->open->n == 0) {
        in->open->opened_ms = (uint64_t)util_clock_ms(CLOCK_MONOTONIC);
        uv_timer_start(&in->age_timer, age_cb, in->cfg->batch_max_age_ms, 0);
    }
    return in->open;
}

/* Cuts a full batch, or stops the age timer of an empty one, and applies the memory bound. */
static void after_message(struct ingest *in)
{
    struct batch *b = in->open;
    if (b->n >= in->cfg->batch_max_rows || batch_bytes(b) >= in->cfg->batch_max_bytes)
        ingest_cut(in);
    else if (b->n == 0)
        uv_timer_stop(&in->age_timer);
    check_pressure(in);
}

/*
 * Where one message's events go: the open batch, with the sender's entry in its peers (a batch
 * that holds BATCH_PEERS_MAX of them is cut first). s->b is NULL when out of memory.
 */
static void begin_message(struct ingest *in, const struct events_origin *o, struct events_sink *s)
{
    *s = (struct events_sink){in->cfg, open_batch(in), 0, &in->next_serial, in->cbs.error, in->ctx};
    if (s->b == NULL || o->peer == NULL)
        return;
    s->peer = batch_peer(s->b, o->peer, o->user);
    if (s->peer == 0 && s->b->npeers >= BATCH_PEERS_MAX) {
        ingest_cut(in);
        s->b = open_batch(in);
        s->peer = s->b ? batch_peer(s->b, o->peer, o->user) : 0;
    }
    if (s->peer == 0)
        s->b = NULL;
}

uint64_t ingest_artifact(struct ingest *in, const struct events_origin *o, uint64_t seq,
                         const char *run_id, const char *path, const char *id, uint64_t size,
                         const char *sha256)
{
    struct events_sink s;
    begin_message(in, o, &s);
    if (s.b == NULL)
        return 0;
    uint64_t serial = events_artifact(&s, o, seq, run_id, path, id, size, sha256);
    if (serial != 0)
        after_message(in);
    return serial;
}

int ingest_artifact_done(struct ingest *in, const char *id, const char *status, const char *error)
{
    static const struct events_origin internal = {0, "", "", "", false, 0, NULL};
    struct events_sink s;
    begin_message(in, &internal, &s);
    if (s.b == NULL || events_artifact_done(&s, id, status, error) != 0)
        return -ENOMEM;
    after_message(in);
    return 0;
}

int ingest_message(struct ingest *in, const struct events_origin *o, const struct proto_msg *msg)
{
    struct events_sink s;
    begin_message(in, o, &s);
    if (s.b == NULL) {
        events_reject(&s, o, msg->seq, PROTO_ERR_SHUTDOWN, "agent out of memory");
        return -ENOMEM;
    }
    int rc = events_from_message(&s, o, msg);
    after_message(in);
    return rc;
}
