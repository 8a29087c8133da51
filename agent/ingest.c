/*
 * Batch cutting, the pending-memory bound and flush barriers, around events.c, which turns
 * each message into validated events in the open batch of the message's writer.
 *
 * With several writers, each run's events go through one of them at a time (its route,
 * routes.h: the least-loaded writer when the run has none), so a run's order holds while runs
 * commit in parallel. An experiment goes to every writer: the
 * original to writer 0, a copy (EV_SHADOW) to each other, in the same place of its stream, so
 * a run start after it finds the experiment whichever writer takes the run. An event is done
 * when it is done on its writer; the flush barrier and the journal's release follow the
 * slowest writer (refresh_done).
 */
#include "ingest.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "log.h"
#include "routes.h"
#include "stats.h"
#include "util.h"
#include "writer.h"

#define MAX_WAITERS 65536

static void age_cb(uv_timer_t *t);

int ingest_init(struct ingest *in, uv_loop_t *loop, const struct trackd_config *cfg,
                struct writer *writers, unsigned nwriters, const struct ingest_cbs *cbs, void *ctx)
{
    memset(in, 0, sizeof *in);
    in->loop = loop;
    in->cfg = cfg;
    in->nparts = nwriters;
    for (unsigned p = 0; p < nwriters; p++)
        in->parts[p].writer = &writers[p];
    in->cbs = *cbs;
    in->ctx = ctx;
    in->next_serial = 1;
    uv_timer_init(loop, &in->age_timer);
    in->age_timer.data = in;
    return routes_init(&in->routes, nwriters);
}

size_t ingest_pending_bytes(const struct ingest *in)
{
    size_t bytes = in->queued_bytes;
    for (unsigned p = 0; p < in->nparts; p++)
        bytes += in->parts[p].open ? batch_bytes(in->parts[p].open) : 0;
    return bytes;
}

bool ingest_drained(const struct ingest *in)
{
    for (unsigned p = 0; p < in->nparts; p++) {
        const struct ingest_part *pt = &in->parts[p];
        if ((pt->open && pt->open->n > 0) || !writer_idle(pt->writer))
            return false;
    }
    return true;
}

/* The first event of pt not yet finished (with the writer, or open), or NULL. */
static const struct ev *first_pending(const struct ingest_part *pt)
{
    if (pt->writer->head)
        return &pt->writer->head->evs[0];
    return pt->open && pt->open->n ? &pt->open->evs[0] : NULL;
}

/* The journal record of pt's first unfinished journaled event; 0 when none. */
static uint64_t first_pending_lsn(const struct ingest_part *pt)
{
    for (const struct batch *b = pt->writer->head; b; b = b->next)
        for (size_t f = 0; f < b->nframes; f++)
            if (b->frames[f].lsn)
                return b->frames[f].lsn;
    if (pt->open)
        for (size_t f = 0; f < pt->open->nframes; f++)
            if (pt->open->frames[f].lsn)
                return pt->open->frames[f].lsn;
    return 0;
}

/* The serial of pt's first unfinished event, or next_serial when it has none. */
static uint64_t first_pending_serial(const struct ingest *in, const struct ingest_part *pt)
{
    const struct ev *ev = first_pending(pt);
    return ev ? ev->serial : in->next_serial;
}

/* Events pt holds unfinished: its open batch and the writer's queue. */
static size_t pending_events(const struct ingest_part *pt)
{
    size_t n = pt->open ? pt->open->n : 0;
    for (const struct batch *b = pt->writer->head; b; b = b->next)
        n += b->n;
    return n;
}

/* The run a message is about, or NULL (experiments, and kinds clients may not send). */
static const struct proto_str *message_run(const struct proto_msg *m)
{
    switch (m->kind) {
    case PROTO_DELETE_TAG: return &m->u.delete_tag.run_id;
    case PROTO_UPDATE_RUN: return &m->u.update_run.run_id;
    case PROTO_START_RUN: return &m->u.start_run.run_id;
    case PROTO_METRIC: return &m->u.metric.run_id;
    case PROTO_METRICS: return &m->u.metrics.run_id;
    case PROTO_PARAMS:
    case PROTO_TAGS: return &m->u.kvs.run_id;
    case PROTO_END_RUN: return &m->u.end_run.run_id;
    default: return NULL;
    }
}

/* A replayed record of another writer count (or from before writers were journaled, when
 * this was the rule): a hash of the run id (FNV-1a), modulo n, the same at every replay. */
static unsigned hash_part(const char *run_id, size_t len, unsigned n)
{
    uint64_t h = UINT64_C(14695981039346656037);
    for (size_t i = 0; i < len; i++)
        h = (h ^ (uint8_t)run_id[i]) * UINT64_C(1099511628211);
    return (unsigned)(h % n);
}

static void count_route(struct ingest *in, size_t known)
{
    if (in->routes.used == known)
        return;
    stats.runs_routed++;
    stats.runs_on_writers = in->routes.used;
    size_t busiest = routes_busiest(&in->routes);
    if (busiest > stats.runs_on_busiest_writer_peak)
        stats.runs_on_busiest_writer_peak = busiest;
}

/*
 * The writer of run (len bytes; NULL: a message about no run). An id of the wrong length is
 * rejected by events.c whatever the writer; out of memory, the run goes to writer 0 unrouted.
 */
static unsigned route_run(struct ingest *in, const char *run, size_t len, int given)
{
    if (in->nparts == 1 || run == NULL || len != PROTO_RUN_ID_LEN)
        return 0;
    if (given == INGEST_ROUTE_HASH)
        given = (int)hash_part(run, len, in->nparts);
    size_t known = in->routes.used;
    struct route *r;
    if (given >= 0) {
        r = routes_set(&in->routes, run, (unsigned)given < in->nparts ? (unsigned)given : 0);
    } else {
        size_t pending[CONFIG_MAX_WRITERS];
        for (unsigned p = 0; p < in->nparts; p++)
            pending[p] = pending_events(&in->parts[p]);
        r = routes_get(&in->routes, run, pending);
    }
    if (r == NULL) {
        log_limited(LOG_ERROR, "[ingest] out of memory routing a run; it goes to writer 0");
        return 0;
    }
    count_route(in, known);
    return r->part;
}

unsigned ingest_route(struct ingest *in, const struct proto_msg *msg, int given)
{
    const struct proto_str *run = message_run(msg);
    return route_run(in, run ? run->ptr : NULL, run ? run->len : 0, given);
}

/* The run's message is in, on writer p: its route stays while these events are unfinished. */
static void route_done(struct ingest *in, const char *run, size_t len, unsigned p)
{
    if (in->nparts == 1 || run == NULL || len != PROTO_RUN_ID_LEN)
        return;
    size_t known = in->routes.used;
    struct route *r = routes_set(&in->routes, run, p);
    if (r)
        r->mark = in->next_serial;
    count_route(in, known);
}

void ingest_tick(struct ingest *in)
{
    if (in->nparts == 1)
        return;
    uint64_t first[CONFIG_MAX_WRITERS];
    for (unsigned p = 0; p < in->nparts; p++)
        first[p] = first_pending_serial(in, &in->parts[p]);
    routes_sweep(&in->routes, first, in->next_serial);
    stats.runs_on_writers = in->routes.used;
}

/*
 * done_serial and the journal's release from every writer: an event is finished when its
 * writer is past it, and a record when every writer is. Events reach each writer in serial
 * (and journal) order, so the slowest writer's first unfinished event bounds both.
 */
static void refresh_done(struct ingest *in)
{
    uint64_t done = in->next_serial - 1, release = in->last_lsn;
    for (unsigned p = 0; p < in->nparts; p++) {
        const struct ev *ev = first_pending(&in->parts[p]);
        if (ev && ev->serial - 1 < done)
            done = ev->serial - 1;
        uint64_t lsn = first_pending_lsn(&in->parts[p]);
        if (lsn && lsn - 1 < release)
            release = lsn - 1;
    }
    if (done > in->done_serial)
        in->done_serial = done;
    if (release > in->released) {
        in->released = release;
        if (in->cbs.released)
            in->cbs.released(in->ctx, release);
    }
}

static void update_gauges(struct ingest *in)
{
    stats.queue_bytes = ingest_pending_bytes(in);
    if (stats.queue_bytes > stats.queue_bytes_peak)
        stats.queue_bytes_peak = stats.queue_bytes;
    uint64_t events = in->queued_events;
    for (unsigned p = 0; p < in->nparts; p++)
        events += in->parts[p].open ? in->parts[p].open->n : 0;
    stats.queue_events = events;
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

/* True when some open batch holds events. */
static bool any_open(const struct ingest *in)
{
    for (unsigned p = 0; p < in->nparts; p++)
        if (in->parts[p].open && in->parts[p].open->n)
            return true;
    return false;
}

/* Hands partition p's open batch to its writer. */
static void cut(struct ingest *in, unsigned p)
{
    struct ingest_part *pt = &in->parts[p];
    pt->age_due = false;
    struct batch *b = pt->open;
    if (b == NULL || b->n == 0)
        return;
    pt->open = NULL;
    in->queued_bytes += batch_bytes(b);
    in->queued_events += b->n;
    writer_submit(pt->writer, b);
}

void ingest_cut(struct ingest *in)
{
    uv_timer_stop(&in->age_timer);
    for (unsigned p = 0; p < in->nparts; p++)
        cut(in, p);
}

static void age_cb(uv_timer_t *t)
{
    struct ingest *in = t->data;
    /* While a writer is busy, let its batch grow: larger transactions drain faster. */
    for (unsigned p = 0; p < in->nparts; p++) {
        struct ingest_part *pt = &in->parts[p];
        if (writer_idle(pt->writer))
            cut(in, p);
        else if (pt->open && pt->open->n)
            pt->age_due = true;
    }
}

/* True when every event up to serial is finished and no upload at or below it runs of
 * conn_id's, or of a client that is gone (0): that client may come back with the flush. */
static bool barrier_passed(const struct ingest *in, uint32_t conn_id, uint64_t serial)
{
    if (serial > in->done_serial)
        return false;
    for (size_t i = 0; i < in->nholds; i++)
        if ((in->holds[i].conn_id == conn_id || in->holds[i].conn_id == 0) &&
            in->holds[i].serial <= serial)
            return false;
    return true;
}

static void answer_waiters(struct ingest *in)
{
    size_t keep = 0;
    for (size_t i = 0; i < in->nwaiters; i++) {
        struct flush_waiter *fw = &in->waiters[i];
        if (barrier_passed(in, fw->conn_id, fw->serial))
            in->cbs.flushed(in->ctx, fw->conn_id, fw->flush_seq);
        else
            in->waiters[keep++] = *fw;
    }
    in->nwaiters = keep;
}

int ingest_hold(struct ingest *in, uint32_t conn_id, uint64_t serial)
{
    for (size_t i = 0; i < in->nholds; i++) {
        if (in->holds[i].serial == serial) {
            in->holds[i].conn_id = conn_id;
            answer_waiters(in); /* its former client's barriers may pass now */
            return 0;
        }
    }
    struct ingest_hold *h = util_grow(in->holds, &in->capholds, in->nholds, sizeof *h, 16);
    if (h == NULL)
        return -ENOMEM;
    in->holds = h;
    in->holds[in->nholds++] = (struct ingest_hold){conn_id, serial};
    return 0;
}

void ingest_unhold(struct ingest *in, uint64_t serial)
{
    for (size_t i = 0; i < in->nholds; i++) {
        if (in->holds[i].serial == serial) {
            in->holds[i] = in->holds[--in->nholds];
            answer_waiters(in);
            return;
        }
    }
}

void ingest_batch_done(struct ingest *in, struct batch *b)
{
    size_t bytes = batch_bytes(b);
    unsigned p = b->part < in->nparts ? b->part : 0;
    in->queued_bytes -= bytes < in->queued_bytes ? bytes : in->queued_bytes;
    in->queued_events -= b->n < in->queued_events ? b->n : in->queued_events;
    batch_free(b);
    free(b);
    refresh_done(in);
    answer_waiters(in);
    struct ingest_part *pt = &in->parts[p];
    if (writer_idle(pt->writer) && (pt->age_due || in->nwaiters > 0))
        cut(in, p);
    check_pressure(in);
}

int ingest_flush(struct ingest *in, uint32_t conn_id, uint64_t flush_seq)
{
    stats.flushes++;
    uint64_t target = in->next_serial - 1;
    refresh_done(in);
    if (barrier_passed(in, conn_id, target)) {
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
    for (size_t i = 0; i < in->nholds; i++)
        if (in->holds[i].conn_id == conn_id)
            in->holds[i].conn_id = 0;
    size_t keep = 0;
    for (size_t i = 0; i < in->nwaiters; i++)
        if (in->waiters[i].conn_id != conn_id)
            in->waiters[keep++] = in->waiters[i];
    in->nwaiters = keep;
}

void ingest_close(struct ingest *in)
{
    routes_free(&in->routes);
    free(in->holds);
    in->holds = NULL;
    in->nholds = in->capholds = 0;
    for (unsigned p = 0; p < in->nparts; p++) {
        struct ingest_part *pt = &in->parts[p];
        if (pt->open) {
            batch_free(pt->open);
            free(pt->open);
            pt->open = NULL;
        }
    }
    free(in->waiters);
    in->waiters = NULL;
    in->nwaiters = in->capwaiters = 0;
    uv_timer_stop(&in->age_timer);
    uv_close((uv_handle_t *)&in->age_timer, NULL);
}

/* Partition p's open batch (made if needed); NULL when out of memory. The age timer runs
 * while any open batch holds events. */
static struct batch *open_batch(struct ingest *in, unsigned p)
{
    struct ingest_part *pt = &in->parts[p];
    if (pt->open == NULL) {
        pt->open = malloc(sizeof *pt->open);
        if (pt->open == NULL)
            return NULL;
        batch_init(pt->open);
        pt->open->part = p;
        pt->open->max_rows = in->cfg->batch_max_rows;
    }
    if (pt->open->n == 0) {
        pt->open->opened_ms = (uint64_t)util_clock_ms(CLOCK_MONOTONIC);
        if (!uv_is_active((uv_handle_t *)&in->age_timer))
            uv_timer_start(&in->age_timer, age_cb, in->cfg->batch_max_age_ms, 0);
    }
    return pt->open;
}

/* Cuts partition p's batch when full, stops the age timer when nothing is open, and applies
 * the memory bound. */
static void after_message(struct ingest *in, unsigned p)
{
    struct batch *b = in->parts[p].open;
    if (b && (b->n >= in->cfg->batch_max_rows || batch_bytes(b) >= in->cfg->batch_max_bytes))
        cut(in, p);
    if (!any_open(in))
        uv_timer_stop(&in->age_timer);
    check_pressure(in);
}

/*
 * Where one message's events go: partition p's open batch, with the sender's entry in its peers
 * (a batch that holds BATCH_PEERS_MAX of them is cut first). s->b is NULL when out of memory.
 */
static void begin_message(struct ingest *in, unsigned p, const struct events_origin *o,
                          struct events_sink *s)
{
    *s = (struct events_sink){in->cfg,          open_batch(in, p), 0,
                              &in->next_serial, in->cbs.error,     in->ctx};
    if (o->lsn > in->last_lsn)
        in->last_lsn = o->lsn;
    if (s->b == NULL || o->peer == NULL)
        return;
    s->peer = batch_peer(s->b, o->peer, o->user);
    if (s->peer == 0 && s->b->npeers >= BATCH_PEERS_MAX) {
        cut(in, p);
        s->b = open_batch(in, p);
        s->peer = s->b ? batch_peer(s->b, o->peer, o->user) : 0;
    }
    if (s->peer == 0)
        s->b = NULL;
}

/*
 * Copies the experiments among events [from, n) of partition 0's open batch to every other
 * partition, as EV_SHADOW events with the original's serial, frame and record. Out of memory,
 * a copy is missing: a run start on that writer may then not find the experiment yet.
 */
static void shadow_experiments(struct ingest *in, size_t from)
{
    for (unsigned p = 1; p < in->nparts; p++) {
        const struct batch *src = in->parts[0].open;
        for (size_t i = from; src && i < src->n; i++) {
            const struct ev *ev = &src->evs[i];
            if (ev->kind != EV_EXPERIMENT || (ev->flags & EV_REJECTED))
                continue;
            struct batch *b = open_batch(in, p);
            const struct ev_frame *f = ev_frame(src, ev);
            struct sref name, loc;
            struct ev *copy;
            if (b == NULL || batch_frame(b, 0, f->seq, f->lsn, 0, NULL) != 0 ||
                batch_str(b, batch_sptr(src, ev->experiment.name), ev->experiment.name.len,
                          &name) != 0 ||
                batch_str(b, batch_sptr(src, ev->experiment.location), ev->experiment.location.len,
                          &loc) != 0 ||
                (copy = batch_push(b, EV_EXPERIMENT)) == NULL) {
                log_limited(LOG_ERROR,
                            "[ingest] out of memory copying an experiment for "
                            "writer %u",
                            p);
                continue;
            }
            copy->flags = EV_SHADOW;
            copy->serial = ev->serial;
            copy->experiment.name = name;
            copy->experiment.location = loc;
        }
        after_message(in, p);
    }
}

uint64_t ingest_artifact(struct ingest *in, const struct events_origin *o, uint64_t seq,
                         const char *run_id, const char *path, const char *id, uint64_t size,
                         const char *sha256)
{
    struct events_sink s;
    size_t len = strlen(run_id);
    unsigned p = route_run(in, run_id, len, INGEST_ROUTE_NEW);
    begin_message(in, p, o, &s);
    if (s.b == NULL)
        return 0;
    uint64_t serial = events_artifact(&s, o, seq, run_id, path, id, size, sha256);
    route_done(in, run_id, len, p);
    if (serial != 0)
        after_message(in, p);
    return serial;
}

int ingest_artifact_done(struct ingest *in, const char *id, const char *status, const char *error)
{
    static const struct events_origin internal = {0, "", "", "", false, 0, NULL};
    struct events_sink s;
    /* Any writer will do: the ledger row it updates was committed before the upload began. */
    begin_message(in, 0, &internal, &s);
    if (s.b == NULL || events_artifact_done(&s, id, status, error) != 0)
        return -ENOMEM;
    after_message(in, 0);
    return 0;
}

int ingest_message(struct ingest *in, const struct events_origin *o, const struct proto_msg *msg,
                   unsigned p)
{
    struct events_sink s;
    const struct proto_str *run = message_run(msg);
    if (p >= in->nparts)
        p = 0;
    begin_message(in, p, o, &s);
    if (s.b == NULL) {
        events_reject(&s, o, msg->seq, PROTO_ERR_SHUTDOWN, "agent out of memory");
        return -ENOMEM;
    }
    size_t from = s.b->n;
    int rc = events_from_message(&s, o, msg);
    if (run)
        route_done(in, run->ptr, run->len, p);
    if (msg->kind == PROTO_EXPERIMENT && in->nparts > 1)
        shadow_experiments(in, from);
    after_message(in, p);
    return rc;
}
