/*
 * Writer state machine. All libpq calls are non-blocking: the socket is
 * watched with uv_poll and every state reads what has arrived, sends what it
 * can, and returns to the loop. One range of one batch is in flight at a
 * time, so a writer commits its events in arrival order, and ingest can tell
 * what is finished from the first event it still holds (ingest.c refresh_done).
 */
#include "writer.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "dbobjects.h"
#include "log.h"
#include "stats.h"
#include "util.h"

#define COPY_CHUNK (64 * 1024)
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 10000

enum stmt {
    STMT_BEGIN,
    STMT_GUARD,
    STMT_EXPS,
    STMT_RUNS,
    STMT_RUN_STATE,
    STMT_TAGS,
    STMT_RENAMES,
    STMT_PARAMS,
    STMT_METRICS,
    STMT_LATEST,
    STMT_ENDS,
    STMT_DELETES,
    STMT_ARTIFACTS,
    STMT_ARTIFACTS_DONE,
    STMT_PROGRESS,
    STMT_COMMIT,
    STMT_COUNT
};

static void drive(struct writer *w);
static void report_run_states(struct writer *w);
static void note_artifacts(struct writer *w, const PGresult *res);
static void report_artifacts(struct writer *w);
static void clear_check(struct writer *w);
static void setup_next(struct writer *w);
static void start_next(struct writer *w);
static int plan_owners(struct writer *w);
static bool range_ready(struct writer *w);
static int push_range(struct writer *w, struct range r);
static void connect_start(struct writer *w);
static void connect_failed(struct writer *w, const char *why);

const char *writer_state_name(enum writer_state s)
{
    static const char *const names[] = {"disconnected", "resolving",    "connecting", "checking",
                                        "ledger",       "owners table", "progress",   "idle",
                                        "owners",       "prepare",      "txn_start",  "copy_data",
                                        "pipeline",     "rollback",     "backoff",    "closing"};
    _Static_assert(sizeof names / sizeof names[0] == W_CLOSING + 1, "a name per state");
    return names[s];
}

/* Keeps stats.db_connections (and db_connected: any connection up) in step with w. */
static void note_up(struct writer *w, bool up)
{
    if (w->up == up)
        return;
    w->up = up;
    if (up)
        stats.db_connections++;
    else
        stats.db_connections--;
    stats.db_connected = stats.db_connections > 0;
}

static void set_state(struct writer *w, enum writer_state s)
{
    if (w->state != s)
        log_debug("[%s] %s -> %s", w->name, writer_state_name(w->state), writer_state_name(s));
    w->state = s;
}

/* ---- socket watching ----------------------------------------------------- */

static void poll_closed_cb(uv_handle_t *h)
{
    free(h);
}

static void poll_stop(struct writer *w)
{
    if (w->poll) {
        uv_close((uv_handle_t *)w->poll, poll_closed_cb);
        w->poll = NULL;
    }
    w->poll_fd = -1;
    w->poll_events = 0;
}

static void on_poll(uv_poll_t *h, int status, int events);

/* Watches fd for events, re-creating the handle when libpq changed sockets. */
static void poll_watch(struct writer *w, int fd, int events)
{
    if (w->poll && w->poll_fd != fd)
        poll_stop(w);
    if (w->poll == NULL) {
        w->poll = malloc(sizeof *w->poll);
        if (w->poll == NULL || uv_poll_init(w->loop, w->poll, fd) != 0) {
            free(w->poll);
            w->poll = NULL;
            log_error("[%s] cannot watch the PostgreSQL socket", w->name);
            return;
        }
        w->poll->data = w;
        w->poll_fd = fd;
        w->poll_events = 0;
    }
    if (events != w->poll_events) {
        uv_poll_start(w->poll, events, on_poll);
        w->poll_events = events;
    }
}

/* Sends buffered output; watches for writability while libpq has more. */
static int flush_out(struct writer *w)
{
    int r = PQflush(w->pg);
    if (r < 0)
        return -EIO; /* the connection's error message says why */
    poll_watch(w, PQsocket(w->pg), UV_READABLE | (r == 1 ? UV_WRITABLE : 0));
    return 0;
}

/* ---- connection ---------------------------------------------------------- */

/*
 * A connect cycle tries every address of every host of the DSN in turn, each bounded by the
 * connect timeout, and backs off only after the last one failed. The agent resolves host names
 * itself (uv_getaddrinfo, off the loop) and hands libpq one numeric hostaddr at a time: libpq
 * never blocks the loop in DNS, and an address that does not answer costs one timeout instead
 * of the whole cycle (libpq's own walk over its host list is not bounded in non-blocking mode).
 */
static void connect_attempt(struct writer *w);
static void connect_target(struct writer *w);

static void backoff_cb(uv_timer_t *t);

static void backoff(struct writer *w)
{
    set_state(w, W_BACKOFF);
    uv_timer_start(
        &w->timer, backoff_cb,
        util_backoff_ms(w->attempts + 1, BACKOFF_MIN_MS, BACKOFF_MAX_MS, (uint32_t)rand()), 0);
    w->attempts++;
}

static void backoff_cb(uv_timer_t *t)
{
    struct writer *w = t->data;
    if (w->state == W_BACKOFF) {
        if (w->pg == NULL)
            connect_start(w);
        else {
            set_state(w, W_IDLE);
            start_next(w);
        }
    } else if (w->state == W_CONNECTING) {
        char why[64];
        snprintf(why, sizeof why, "no answer within %u ms", w->connect_timeout_ms);
        connect_failed(w, why);
    }
}

/* The in-flight range goes back on the stack to be tried again. */
static void requeue_current(struct writer *w)
{
    if (w->head && w->cur.hi > w->cur.lo) {
        /* Popped from the stack, so a slot is free. */
        if (push_range(w, w->cur) != 0)
            log_error("[%s] out of memory re-queueing a range", w->name);
        w->cur.lo = w->cur.hi = 0;
    }
}

static void count_retry(const struct writer *w, const char *sqlstate, const char *what,
                        const char *msg);

static void conn_lost(struct writer *w, const char *what)
{
    /* A terminated backend says why (57P01, 57P02, ...) before the socket closes. */
    if (w->failed && w->fail_state[0])
        count_retry(w, w->fail_state, what, w->fail_msg);
    else
        count_retry(w, NULL, what, w->pg ? PQerrorMessage(w->pg) : "");
    note_up(w, false);
    requeue_current(w);
    clear_check(w);
    if (w->pg)
        PQfinish(w->pg);
    w->pg = NULL;
    poll_stop(w);
    backoff(w);
}

/* Where the current attempt goes, for log lines: "db1 (10.0.0.5) port 5432". */
static void describe_attempt(const struct writer *w, char *buf, size_t len)
{
    const struct pgconn_target *t = w->targets.n ? &w->targets.v[w->target_i] : NULL;
    const char *host = t ? (t->host ? t->host : t->hostaddr) : "the DSN's default host";
    const char *addr = w->addr ? w->addr_text : t && t->host && t->hostaddr ? t->hostaddr : NULL;
    if (addr && strcmp(addr, host) == 0)
        addr = NULL;
    snprintf(buf, len, "%s%s%s%s port %s", host, addr ? " (" : "", addr ? addr : "",
             addr ? ")" : "", t && t->port ? t->port : "default");
}

/* The current attempt failed (refused, timed out, rejected): move on to the next address. */
static void connect_failed(struct writer *w, const char *why)
{
    char where[sizeof w->addr_text + 300];
    describe_attempt(w, where, sizeof where);
    int wl = (int)strcspn(why, "\n");
    log_debug("[%s] cannot connect to PostgreSQL at %s: %.*s", w->name, where, wl, why);
    size_t used = strlen(w->cycle_errors);
    snprintf(w->cycle_errors + used, sizeof w->cycle_errors - used, "%s%s: %.*s", used ? "; " : "",
             where, wl, why);
    uv_timer_stop(&w->timer);
    if (w->pg)
        PQfinish(w->pg);
    w->pg = NULL;
    poll_stop(w);
    if (w->addr)
        w->addr = w->addr->ai_next;
    if (w->addr) {
        connect_attempt(w);
        return;
    }
    if (w->addrs) {
        uv_freeaddrinfo(w->addrs);
        w->addrs = NULL;
    }
    if (++w->target_i < w->targets.n) {
        connect_target(w);
        return;
    }
    /* Every address failed: the cycle starts again after a back-off. */
    log_limited(LOG_WARN, "[%s] cannot connect to PostgreSQL (%s); retrying", w->name,
                w->cycle_errors);
    stats.db_retries++;
    stats.db_errors_class_08++;
    note_up(w, false);
    backoff(w);
}

static void connect_poll(struct writer *w)
{
    PostgresPollingStatusType r = PQconnectPoll(w->pg);
    switch (r) {
    case PGRES_POLLING_OK:
        uv_timer_stop(&w->timer);
        if (w->addrs) {
            uv_freeaddrinfo(w->addrs);
            w->addrs = NULL;
            w->addr = NULL;
        }
        stats.db_connects++;
        PQsetNoticeProcessor(w->pg, pgconn_notice, NULL);
        if (PQsetnonblocking(w->pg, 1) != 0) {
            conn_lost(w, "connect");
            return;
        }
        log_info("[%s] connected to PostgreSQL %s on %s port %s (server %d)%s%s", w->name,
                 PQdb(w->pg), PQhost(w->pg), PQport(w->pg), PQserverVersion(w->pg),
                 w->cycle_errors[0] ? "; failed before it: " : "", w->cycle_errors);
        /* Every new server is checked: after an offline start or a failover it is new to us. */
        set_state(w, W_CHECKING);
        if (!PQsendQuery(w->pg, pgconn_check_sql) || flush_out(w) != 0)
            conn_lost(w, "schema check");
        return;
    case PGRES_POLLING_READING:
    case PGRES_POLLING_WRITING:
        /*
         * libpq may have closed its socket and opened another during this step (SSL or GSS
         * refused, so it retries in the clear); the new one often gets the same number, and
         * epoll forgot the old file when it was closed. So the watch starts afresh each step.
         */
        poll_stop(w);
        poll_watch(w, PQsocket(w->pg), r == PGRES_POLLING_READING ? UV_READABLE : UV_WRITABLE);
        return;
    default: connect_failed(w, PQerrorMessage(w->pg)); return;
    }
}

/* Starts libpq on the current address (w->addr, or the target as the DSN gives it). */
static void connect_attempt(struct writer *w)
{
    set_state(w, W_CONNECTING);
    if (w->targets.n) {
        const struct pgconn_target *t = &w->targets.v[w->target_i];
        const char *hostaddr = t->hostaddr;
        if (w->addr) {
            if (uv_ip_name(w->addr->ai_addr, w->addr_text, sizeof w->addr_text) != 0) {
                connect_failed(w, "unusable address from the resolver");
                return;
            }
            hostaddr = w->addr_text;
        }
        pgconn_params_target(&w->params, t->host, hostaddr, t->port);
    }
    w->pg = PQconnectStartParams(w->params.keys, w->params.values, 1);
    if (w->pg == NULL || PQstatus(w->pg) == CONNECTION_BAD) {
        connect_failed(w, w->pg ? PQerrorMessage(w->pg) : "out of memory");
        return;
    }
    uv_timer_start(&w->timer, backoff_cb, w->connect_timeout_ms, 0);
    /* libpq: behave as if PQconnectPoll had returned PGRES_POLLING_WRITING. */
    poll_watch(w, PQsocket(w->pg), UV_WRITABLE);
}

static void resolved_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct writer *w = req->data;
    w->resolving = false;
    if (w->state != W_RESOLVING) {
        /* Closing: the request was cancelled or finished too late. */
        uv_freeaddrinfo(res);
        return;
    }
    if (status != 0) {
        connect_failed(w, uv_strerror(status));
        return;
    }
    w->addrs = w->addr = res;
    connect_attempt(w);
}

/* Resolves the current target's host name off the loop, or attempts it as given. */
static void connect_target(struct writer *w)
{
    const struct pgconn_target *t = w->targets.n ? &w->targets.v[w->target_i] : NULL;
    w->addrs = w->addr = NULL;
    if (t == NULL || t->hostaddr || pgconn_host_is_socket(t->host)) {
        connect_attempt(w);
        return;
    }
    /* As libpq asks: any family, stream sockets, every address in the resolver's order. */
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    set_state(w, W_RESOLVING);
    w->gai.data = w;
    int rc = uv_getaddrinfo(w->loop, &w->gai, resolved_cb, t->host, NULL, &hints);
    if (rc != 0) {
        connect_failed(w, uv_strerror(rc));
        return;
    }
    w->resolving = true;
}

static void connect_start(struct writer *w)
{
    w->target_i = 0;
    w->cycle_errors[0] = '\0';
    connect_target(w);
}

/* ---- transaction steps ----------------------------------------------------- */

static const char *const stmt_names[] = {"begin",
                                         "direct guard",
                                         "experiments",
                                         "runs",
                                         "run states",
                                         "tags",
                                         "run names",
                                         "params",
                                         "metrics",
                                         "latest_metrics",
                                         "end runs",
                                         "tag deletes",
                                         "artifact ledger",
                                         "artifact results",
                                         "journal progress",
                                         "commit"};
_Static_assert(sizeof stmt_names / sizeof stmt_names[0] == STMT_COUNT, "a name per statement");

static void record_failure(struct writer *w, const PGresult *res)
{
    if (w->failed)
        return;
    w->failed = true;
    const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    const char *d = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
    snprintf(w->fail_state, sizeof w->fail_state, "%s", st ? st : "");
    const char *where =
        (w->state == W_PIPELINE || w->state == W_PREPARE) && w->stmt_index < w->pending_results
            ? stmt_names[w->stmts[w->stmt_index]]
        : w->sql.n_metrics ? "begin/copy"
                           : "begin";
    snprintf(w->fail_msg, sizeof w->fail_msg, "%s (in %s)%s%s", m ? m : PQresultErrorMessage(res),
             where, d ? ": " : "", d ? d : "");
}

static void clear_art_ret(struct writer *w)
{
    for (size_t i = 0; i < w->n_art_ret * 3; i++)
        free(w->art_ret[i]);
    free(w->art_ret);
    w->art_ret = NULL;
    w->n_art_ret = 0;
}

/* Forgets what the statements of the current range returned. */
static void clear_range_results(struct writer *w)
{
    clear_art_ret(w);
    PQclear(w->run_states);
    w->run_states = NULL;
    for (size_t i = 0; i < w->n_param_changed; i++)
        free(w->param_old[i]);
    free(w->param_changed);
    free(w->param_old);
    w->param_changed = NULL;
    w->param_old = NULL;
    w->n_param_changed = 0;
}

static void send_rollback(struct writer *w)
{
    set_state(w, W_ROLLBACK);
    if (!PQsendQuery(w->pg, "ROLLBACK") || flush_out(w) != 0)
        conn_lost(w, "rollback");
}

static int send_stmt(struct writer *w, enum stmt which, const char *sql, int n,
                     const char *const *values)
{
    if (!PQsendQueryParams(w->pg, sql, n, NULL, values, NULL, NULL, 0))
        return -EIO; /* the connection's error message says why */
    w->stmts[w->pending_results++] = (uint8_t)which;
    return 0;
}

#define BUFSTR(buf) ((const char *)(buf).data)

/* Opens a pipeline for one round trip of statements (send_stmt). */
static bool pipeline_open(struct writer *w)
{
    if (!PQenterPipelineMode(w->pg)) {
        conn_lost(w, "pipeline");
        return false;
    }
    w->pending_results = 0;
    w->stmt_index = 0;
    return true;
}

/* Ends the pipeline with a sync and sends it; rc is what queueing the statements returned.
 * drive() reads the results in state st. */
static void pipeline_send(struct writer *w, int rc, enum writer_state st)
{
    if (rc != 0 || !PQpipelineSync(w->pg) || flush_out(w) != 0) {
        conn_lost(w, "pipeline");
        return;
    }
    w->sync_sent_us = (uint64_t)util_clock_us(CLOCK_MONOTONIC);
    set_state(w, st);
}

/* The range's experiments and run starts (and who owns each new run). */
static int send_starts(struct writer *w, const char *now)
{
    struct batch_sql *s = &w->sql;
    int rc = 0;
    if (s->n_exps) {
        const char *v[] = {BUFSTR(s->exp_names), w->artifact_root, now, BUFSTR(s->exp_locations)};
        rc |= send_stmt(w, STMT_EXPS, batch_sql_experiments[w->variant], 4, v);
    }
    if (s->n_runs) {
        const char *v[] = {BUFSTR(s->run_ids),   BUFSTR(s->run_names),
                           BUFSTR(s->run_users), BUFSTR(s->run_starts),
                           BUFSTR(s->run_exps),  BUFSTR(s->run_exp_ids),
                           BUFSTR(s->own_runs),  BUFSTR(s->own_uids),
                           BUFSTR(s->own_gids),  now};
        bool owned = s->n_owns && w->owners_ok;
        rc |= send_stmt(w, STMT_RUNS,
                        owned ? batch_sql_runs_owned[w->variant] : batch_sql_runs[w->variant],
                        owned ? 10 : 6, v);
    }
    return rc;
}

/* Sends every statement of the range and COMMIT in one pipeline. */
static void send_pipeline(struct writer *w)
{
    struct batch_sql *s = &w->sql;
    char now[24];
    snprintf(now, sizeof now, "%" PRId64, util_clock_ms(CLOCK_REALTIME));
    int rc = 0;

    if (!pipeline_open(w))
        return;
    if (!w->direct) /* else send_prepare sent them */
        rc |= send_starts(w, now);
    if (s->n_state_runs) {
        const char *v[] = {BUFSTR(s->state_runs), BUFSTR(s->state_exps), BUFSTR(s->state_exp_ids)};
        rc |= send_stmt(w, STMT_RUN_STATE, batch_sql_run_state[w->variant], 3, v);
    }
    if (s->n_tags) {
        const char *v[] = {BUFSTR(s->tag_keys), BUFSTR(s->tag_values), BUFSTR(s->tag_runs)};
        rc |= send_stmt(w, STMT_TAGS, batch_sql_tags, 3, v);
    }
    if (s->n_renames) {
        const char *v[] = {BUFSTR(s->rename_runs), BUFSTR(s->rename_values)};
        rc |= send_stmt(w, STMT_RENAMES, batch_sql_renames, 2, v);
    }
    if (s->n_params) {
        const char *v[] = {BUFSTR(s->param_keys), BUFSTR(s->param_values), BUFSTR(s->param_runs),
                           BUFSTR(s->param_ords)};
        rc |= send_stmt(w, STMT_PARAMS, batch_sql_params, 4, v);
    }
    if (s->n_metrics) {
        const char *v[] = {BUFSTR(s->state_runs)};
        if (!w->direct) /* else the COPY wrote them */
            rc |= send_stmt(w, STMT_METRICS, batch_sql_metrics, 1, v);
        const char *l[] = {BUFSTR(s->latest_keys), BUFSTR(s->latest_values),
                           BUFSTR(s->latest_ts),   BUFSTR(s->latest_steps),
                           BUFSTR(s->latest_nans), BUFSTR(s->latest_runs)};
        rc |= send_stmt(w, STMT_LATEST, batch_sql_latest, 6, l);
    }
    if (s->n_ends) {
        const char *v[] = {BUFSTR(s->end_runs), BUFSTR(s->end_statuses), BUFSTR(s->end_times)};
        rc |= send_stmt(w, STMT_ENDS, batch_sql_end_runs, 3, v);
    }
    if (s->n_dels) {
        const char *v[] = {BUFSTR(s->del_runs), BUFSTR(s->del_keys)};
        rc |= send_stmt(w, STMT_DELETES, batch_sql_delete_tags, 2, v);
    }
    if (s->n_arts) {
        const char *v[] = {BUFSTR(s->art_ids),   BUFSTR(s->art_runs), BUFSTR(s->art_paths),
                           BUFSTR(s->art_sizes), BUFSTR(s->art_shas), now};
        rc |= send_stmt(w, STMT_ARTIFACTS, batch_sql_artifacts, 6, v);
    }
    if (s->n_dones) {
        const char *v[] = {BUFSTR(s->done_ids), BUFSTR(s->done_statuses), BUFSTR(s->done_errors),
                           now};
        rc |= send_stmt(w, STMT_ARTIFACTS_DONE, batch_sql_artifacts_done, 4, v);
    }
    if (w->range_lsn) {
        char lsn[24], events[24];
        snprintf(lsn, sizeof lsn, "%" PRIu64, w->range_lsn);
        snprintf(events, sizeof events, "%" PRIu64, w->range_events);
        const char *v[] = {w->journal_id, lsn, events, now};
        rc |= send_stmt(w, STMT_PROGRESS, dbobjects_progress_sql, 4, v);
    }
    rc |= send_stmt(w, STMT_COMMIT, "COMMIT", 0, NULL);
    pipeline_send(w, rc, W_PIPELINE);
}

/*
 * The direct path's first round trip, one pipeline: BEGIN, the range's experiments and run
 * starts, and the guard, which names the range's runs that are missing or not active once
 * those starts are in. prepare_done sends the COPY into metrics, or rolls back.
 */
static void send_prepare(struct writer *w)
{
    char now[24];
    snprintf(now, sizeof now, "%" PRId64, util_clock_ms(CLOCK_REALTIME));
    if (!pipeline_open(w))
        return;
    const char *v[] = {BUFSTR(w->sql.state_runs)};
    int rc = send_stmt(w, STMT_BEGIN, "BEGIN", 0, NULL);
    rc |= send_starts(w, now);
    rc |= send_stmt(w, STMT_GUARD, batch_sql_direct_guard, 1, v);
    pipeline_send(w, rc, W_PREPARE);
}

/* The first round trip is answered: COPY the points in, or give the range up to the staging
 * path (range_failed, after the rollback). */
static void prepare_done(struct writer *w)
{
    if (w->failed || w->direct_refused) {
        send_rollback(w);
        return;
    }
    set_state(w, W_TXN_START);
    if (!PQsendQuery(w->pg, batch_sql_direct_copy) || flush_out(w) != 0)
        conn_lost(w, "copy");
}

/* Streams the range's COPY rows. */
static void send_copy(struct writer *w)
{
    struct proto_buf *c = &w->sql.copy;
    while (w->copy_sent < c->len) {
        /* A chunk only once libpq has sent the last one: in nonblocking mode it never refuses
         * data, it grows its output buffer to the whole COPY and keeps that size for the
         * connection's life (megabytes per writer). */
        int f = PQflush(w->pg);
        if (f < 0) {
            conn_lost(w, "copy");
            return;
        }
        if (f > 0) {
            poll_watch(w, PQsocket(w->pg), UV_READABLE | UV_WRITABLE);
            return;
        }
        size_t n = c->len - w->copy_sent;
        if (n > COPY_CHUNK)
            n = COPY_CHUNK;
        int r = PQputCopyData(w->pg, (const char *)c->data + w->copy_sent, (int)n);
        if (r < 0) {
            conn_lost(w, "copy");
            return;
        }
        if (r == 0) {
            poll_watch(w, PQsocket(w->pg), UV_READABLE | UV_WRITABLE);
            return;
        }
        w->copy_sent += n;
    }
    int r = PQputCopyEnd(w->pg, NULL);
    if (r < 0) {
        conn_lost(w, "copy");
        return;
    }
    if (r == 0) {
        poll_watch(w, PQsocket(w->pg), UV_READABLE | UV_WRITABLE);
        return;
    }
    set_state(w, W_TXN_START);
    if (flush_out(w) != 0)
        conn_lost(w, "copy");
}

/* The journal record event i of b came from (0: none). */
static uint64_t lsn_of(const struct batch *b, size_t i)
{
    return ev_frame(b, &b->evs[i])->lsn;
}

/*
 * How many events of the same journal record come before event i. A frame's events are
 * contiguous in one batch, so this is its distance from the record's first event.
 */
static size_t frame_offset(const struct batch *b, size_t i)
{
    size_t first = i;
    while (first > 0 && lsn_of(b, first - 1) == lsn_of(b, i))
        first--;
    return i - first;
}

/*
 * Where the journal stands once [cur.lo, cur.hi) is committed: the last event of the range
 * that came from a durable journal record, as (record LSN, events of that record up to and
 * including it, frame_offset + 1). Sets range_lsn = 0 when nothing new would be recorded.
 */
static void range_progress(struct writer *w)
{
    const struct batch *b = w->head;
    uint64_t durable = w->durable_lsn ? *w->durable_lsn : 0;
    w->range_lsn = w->range_events = 0;
    if (!w->progress_ok)
        return;
    size_t k = w->cur.hi;
    while (k > w->cur.lo && (lsn_of(b, k - 1) == 0 || lsn_of(b, k - 1) > durable))
        k--;
    if (k == w->cur.lo)
        return;
    uint64_t lsn = lsn_of(b, k - 1);
    uint64_t events = frame_offset(b, k - 1) + 1;
    if (lsn < w->progress_lsn || (lsn == w->progress_lsn && events <= w->progress_events))
        return;
    w->range_lsn = lsn;
    w->range_events = events;
}

/* Replayed events the progress row covers were committed before the restart: not again. */
static void skip_committed(struct writer *w)
{
    struct batch *b = w->head;
    if (w->progress_lsn == 0)
        return;
    for (size_t i = w->cur.lo; i < w->cur.hi; i++) {
        struct ev *ev = &b->evs[i];
        uint64_t lsn = lsn_of(b, i);
        if (lsn == 0 || lsn > w->progress_lsn || (ev->flags & EV_REJECTED))
            continue;
        if (lsn == w->progress_lsn && frame_offset(b, i) >= w->progress_events)
            continue;
        ev->flags |= EV_REJECTED | EV_COMMITTED_BEFORE;
        stats.replay_skipped_committed++;
    }
}

/* Whether the current range holds events of journal records read back at start-up. */
static bool range_replayed(const struct writer *w)
{
    for (size_t i = w->cur.lo; i < w->cur.hi; i++)
        if (lsn_of(w->head, i) && lsn_of(w->head, i) <= w->replay_end)
            return true;
    return false;
}

/*
 * The direct path: the range's points COPY straight into metrics, which saves writing each one
 * twice (the staging table, then INSERT ... SELECT). Taken when nothing can make a point
 * conflict or dangle: batch_sql_build left out points equal within the range, nothing in it
 * was replayed after a crash (it may be stored already), and the guard, after the range's run
 * starts, finds every run the range names present and active (send_prepare). If a stored row
 * equals a point or a run is gone after all, the transaction fails and the range goes through
 * the staging path (range_failed; counted in direct_fallbacks).
 */
static void start_range(struct writer *w)
{
    range_progress(w);
    w->failed = false;
    w->fail_state[0] = '\0';
    w->copy_sent = 0;
    w->direct_refused = false;
    clear_range_results(w);
    w->direct = w->sql.n_metrics && !w->cur.staging && !range_replayed(w);
    if (w->direct) {
        stats.ranges_direct++;
        send_prepare(w);
        return;
    }
    set_state(w, W_TXN_START);
    const char *q = w->sql.n_metrics ? batch_sql_begin_copy : "BEGIN";
    if (!PQsendQuery(w->pg, q) || flush_out(w) != 0)
        conn_lost(w, "begin");
}

static bool range_has_work(const struct batch *b, struct range r)
{
    for (size_t i = r.lo; i < r.hi; i++)
        if (!(b->evs[i].flags & EV_REJECTED))
            return true;
    return false;
}

static void reject_ev(struct writer *w, size_t i, uint32_t code, const char *msg)
{
    struct ev *ev = &w->head->evs[i];
    ev->flags |= EV_REJECTED;
    w->cbs.reject(w->ctx, w->head, ev, code, msg);
}

static void param_changed_message(struct writer *w, size_t i, const char *old, char *out, size_t n)
{
    const struct batch *b = w->head;
    const struct ev *ev = &b->evs[i];
    snprintf(out, n,
             "Changing param values is not allowed. Param with key='%.*s' was already logged "
             "with value='%.*s' for run ID='%.*s'. Attempted logging new value '%.*s'.",
             (int)ev->kv.key.len, batch_sptr(b, ev->kv.key), 200, old, PROTO_RUN_ID_LEN,
             ev_run(b, ev), (int)(ev->kv.value.len > 200 ? 200 : ev->kv.value.len),
             batch_sptr(b, ev->kv.value));
}

/* Rejections the range build found (same param twice with different values). */
static void report_build_rejects(struct writer *w)
{
    struct batch *b = w->head;
    for (size_t k = 0; k < w->sql.n_rejected; k++) {
        size_t i = w->sql.rejected[k];
        struct ev *ev = &b->evs[i];
        /* Find the first value for the message. */
        const char *old = "";
        size_t oldlen = 0;
        for (size_t j = w->cur.lo; j < i; j++) {
            const struct ev *o = &b->evs[j];
            if (o->kind == EV_PARAM && o->kv.key.len == ev->kv.key.len &&
                memcmp(ev_run(b, o), ev_run(b, ev), PROTO_RUN_ID_LEN) == 0 &&
                memcmp(batch_sptr(b, o->kv.key), batch_sptr(b, ev->kv.key), ev->kv.key.len) == 0) {
                old = batch_sptr(b, o->kv.value);
                oldlen = o->kv.value.len;
                break;
            }
        }
        char oldz[201];
        snprintf(oldz, sizeof oldz, "%.*s", (int)(oldlen > 200 ? 200 : oldlen), old);
        char msg[1024];
        param_changed_message(w, i, oldz, msg, sizeof msg);
        stats.rejected_param_changed++;
        w->cbs.reject(w->ctx, b, ev, PROTO_ERR_PARAM_CHANGED, msg);
    }
}

static void batch_finished(struct writer *w)
{
    struct batch *b = w->head;
    w->head = b->next;
    if (w->head == NULL)
        w->tail = NULL;
    w->queued--;
    b->next = NULL;
    w->nstack = 0;
    w->head_started = false;
    w->cur.lo = w->cur.hi = 0;
    stats.batches_committed++;
    w->cbs.batch_done(w->ctx, b);
}

static int push_range(struct writer *w, struct range r)
{
    struct range *s = util_grow(w->stack, &w->capstack, w->nstack, sizeof *s, 64);
    if (s == NULL)
        return -ENOMEM;
    w->stack = s;
    w->stack[w->nstack++] = r;
    return 0;
}

/* Picks the next range of the head batch (or the next batch) and starts it. */
/* The last journal record the batch's events came from; 0 when none did. */
static uint64_t batch_last_lsn(const struct batch *b)
{
    for (size_t i = b->n; i > 0; i--)
        if (lsn_of(b, i - 1))
            return lsn_of(b, i - 1);
    return 0;
}

static void start_next(struct writer *w)
{
    while (w->state == W_IDLE && w->head) {
        /* The database never gets ahead of the journal: a batch is written once every record
         * it came from is durable, so a crash can never leave committed events whose record
         * is lost, and the progress row can always cover what a transaction commits.
         * writer_journal_durable() comes back here. */
        if (!w->head_started && w->durable_lsn && batch_last_lsn(w->head) > *w->durable_lsn)
            return;
        if (!w->head_started) {
            w->head_started = true;
            if (w->head->n && push_range(w, (struct range){0, w->head->n, false}) != 0) {
                w->head_started = false;
                backoff(w);
                return;
            }
        }
        if (w->nstack == 0) {
            batch_finished(w);
            continue;
        }
        w->cur = w->stack[--w->nstack];
        skip_committed(w);
        if (!range_has_work(w->head, w->cur))
            continue;
        int lookup = plan_owners(w);
        if (lookup < 0) {
            log_error("[%s] out of memory checking run owners; retrying", w->name);
            requeue_current(w);
            backoff(w);
            return;
        }
        if (lookup > 0 || range_ready(w))
            return;
    }
}

/*
 * The owners of the current range's runs that the cache does not know are looked up first
 * (one query, outside the transaction); returns 1 when that query is sent (owners_done
 * goes on), 0 when every owner is known, -ENOMEM.
 */
static int plan_owners(struct writer *w)
{
    w->owner_ids.len = 0;
    int missing = owners_plan(&w->owners, w->head, w->cur.lo, w->cur.hi, &w->owner_ids);
    if (missing <= 0)
        return missing;
    const char *v[] = {BUFSTR(w->owner_ids)};
    const char *q = w->owners_ok ? dbobjects_run_owners_sql : dbobjects_run_users_sql;
    w->failed = false;
    w->fail_state[0] = '\0';
    set_state(w, W_OWNERS);
    if (!PQsendQueryParams(w->pg, q, 1, NULL, v, NULL, NULL, 0) || flush_out(w) != 0)
        conn_lost(w, "run owner lookup");
    return 1;
}

static void owner_refused(void *ctx, size_t i, const char *msg)
{
    struct writer *w = ctx;
    stats.rejected_not_owner++;
    log_limited(LOG_WARN, "[%s] conn %u: %s", w->name, ev_frame(w->head, &w->head->evs[i])->conn_id,
                msg);
    reject_ev(w, i, PROTO_ERR_FORBIDDEN, msg);
}

/*
 * The current range's owners are known: refuses what its peers may not write, builds the
 * statements and starts the transaction. Returns false when nothing is left to write.
 */
static bool range_ready(struct writer *w)
{
    owners_check(&w->owners, w->head, w->cur.lo, w->cur.hi, owner_refused, w);
    if (batch_sql_build(w->head, w->cur.lo, w->cur.hi, w->schema.tag_value_max, &w->sql) != 0) {
        log_error("[%s] out of memory building statements; retrying", w->name);
        requeue_current(w);
        backoff(w);
        return true;
    }
    report_build_rejects(w);
    if (!range_has_work(w->head, w->cur))
        return false;
    start_range(w);
    return true;
}

/* One result of the owner lookup. */
static void owners_result(struct writer *w, PGresult *res)
{
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        if (!w->failed) {
            const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
            w->failed = true;
            snprintf(w->fail_state, sizeof w->fail_state, "%s", st ? st : "");
            snprintf(w->fail_msg, sizeof w->fail_msg, "%.*s (in the run owner lookup)",
                     (int)strcspn(PQresultErrorMessage(res), "\n"), PQresultErrorMessage(res));
        }
        return;
    }
    for (int r = 0; r < PQntuples(res); r++) {
        const char *run = PQgetvalue(res, r, 0);
        if (strlen(run) != PROTO_RUN_ID_LEN)
            continue; /* not a run id trackd writes; no event can name it */
        int64_t uid = PQgetisnull(res, r, 1) ? -1 : strtoll(PQgetvalue(res, r, 1), NULL, 10);
        /* Without the table a run has no row yet, but may get one: nothing is kept. */
        if (owners_learn(&w->owners, run, uid, PQgetvalue(res, r, 2), PQgetvalue(res, r, 3),
                         w->owners_ok) == -EINVAL)
            log_limited(LOG_ERROR,
                        "[%s] trackd_run_owners has an unreadable row for run %s "
                        "(shared_gids %s); nobody may write to that run until it is fixed",
                        w->name, run, PQgetvalue(res, r, 2));
    }
}

/* The lookup is answered: check and write the range, or try again after a failure. */
static void owners_done(struct writer *w)
{
    if (w->failed) {
        /* The lookup changes nothing, so every failure is worth another try, on a new
         * connection: that one checks the schema and makes trackd_run_owners again. */
        conn_lost(w, "the run owner lookup");
        return;
    }
    set_state(w, W_IDLE);
    if (!range_ready(w))
        start_next(w);
}

static void count_committed(struct writer *w)
{
    const struct batch *b = w->head;
    for (size_t i = w->cur.lo; i < w->cur.hi; i++) {
        const struct ev *ev = &b->evs[i];
        if (ev->flags & (EV_REJECTED | EV_SHADOW))
            continue;
        stats.events_committed++;
        switch (ev->kind) {
        case EV_METRIC: stats.metrics_committed++; break;
        case EV_PARAM: stats.params_committed++; break;
        case EV_TAG: stats.tags_committed++; break;
        case EV_START_RUN: stats.runs_committed++; break;
        default: break;
        }
    }
}

static void range_committed(struct writer *w)
{
    if (w->range_lsn) {
        w->progress_lsn = w->range_lsn;
        w->progress_events = w->range_events;
    }
    report_run_states(w);
    for (size_t k = 0; k < w->n_param_changed; k++) {
        char msg[1024];
        param_changed_message(w, w->param_changed[k], w->param_old[k], msg, sizeof msg);
        stats.rejected_param_changed++;
        reject_ev(w, w->param_changed[k], PROTO_ERR_PARAM_CHANGED, msg);
    }
    report_artifacts(w);
    clear_range_results(w);
    count_committed(w);
    w->attempts = 0;
    w->cur.lo = w->cur.hi = 0;
    set_state(w, W_IDLE);
    start_next(w);
}

/*
 * A transaction that failed for a reason that is not its data: counted by SQLSTATE class and
 * logged with what the operator should look at (rate-limited). what is "" or the step.
 */
static void count_retry(const struct writer *w, const char *sqlstate, const char *what,
                        const char *msg)
{
    const struct pgconn_error_class *c = pgconn_error_class(sqlstate);
    (*c->counter)++;
    stats.db_retries++;
    if (sqlstate && sqlstate[0])
        log_limited(LOG_WARN,
                    "[%s] transaction failed with SQLSTATE %s (class %s, %s): %s; %s; "
                    "the events stay queued and are retried",
                    w->name, sqlstate, c->code, c->name, msg, c->advice);
    else
        log_limited(LOG_WARN, "[%s] PostgreSQL connection lost%s%s: %.*s; %s; retrying", w->name,
                    what[0] ? " during " : "", what, (int)strcspn(msg, "\n"), msg, c->advice);
}

/* Decides what a failed range becomes: a retry, two halves, or a rejection. */
static void range_failed(struct writer *w)
{
    if (w->direct) {
        /* A stored row equal to a point (23505), a run gone (23503) or not active (the guard),
         * or anything only a COPY into metrics meets (row-level security, a view): the staging
         * path sorts these out, says what is wrong with which event, and retries what is
         * worth retrying. The range keeps that path from now on, so it cannot go round. */
        stats.direct_fallbacks++;
        if (w->direct_refused)
            log_debug("[%s] events %zu-%zu name a run that is missing or not active; "
                      "through the staging table instead",
                      w->name, w->cur.lo, w->cur.hi);
        else
            log_limited(strcmp(w->fail_state, "23505") == 0 || strcmp(w->fail_state, "23503") == 0
                            ? LOG_DEBUG
                            : LOG_INFO,
                        "[%s] the direct COPY of events %zu-%zu failed (SQLSTATE %s: %s); "
                        "through the staging table instead",
                        w->name, w->cur.lo, w->cur.hi, w->fail_state, w->fail_msg);
        w->cur.staging = true;
        requeue_current(w);
        set_state(w, W_IDLE);
        start_next(w);
        return;
    }
    stats.batches_failed++;
    if (pgconn_classify(w->fail_state) == PGCONN_RETRY) {
        count_retry(w, w->fail_state, "", w->fail_msg);
        requeue_current(w);
        backoff(w);
        return;
    }
    size_t lo = w->cur.lo, hi = w->cur.hi;
    w->cur.lo = w->cur.hi = 0;
    if (hi - lo == 1 && (w->head->evs[lo].flags & EV_SHADOW)) {
        /* The original, on writer 0, meets the same fate and reports it. */
        w->head->evs[lo].flags |= EV_REJECTED;
    } else if (hi - lo == 1) {
        char msg[700];
        snprintf(msg, sizeof msg, "PostgreSQL rejected the event (SQLSTATE %s): %s", w->fail_state,
                 w->fail_msg);
        log_limited(LOG_WARN, "[%s] %s", w->name, msg);
        stats.rejected_database++;
        reject_ev(w, lo, PROTO_ERR_DATABASE, msg);
    } else {
        /* The first half goes on top so arrival order is kept. */
        size_t mid = lo + (hi - lo) / 2;
        stats.batch_splits++;
        if (push_range(w, (struct range){mid, hi, true}) != 0 ||
            push_range(w, (struct range){lo, mid, true}) != 0) {
            w->cur = (struct range){lo, hi, true};
            requeue_current(w);
            backoff(w);
            return;
        }
    }
    set_state(w, W_IDLE);
    start_next(w);
}

/* Keeps the run-state rows (runs this range must not write to) until COMMIT: takes res when
 * it has rows and returns NULL then, else returns res for the caller to clear. */
static PGresult *note_run_states(struct writer *w, PGresult *res)
{
    PQclear(w->run_states);
    w->run_states = NULL;
    if (PQntuples(res) == 0)
        return res;
    w->run_states = res;
    return NULL;
}

/*
 * After COMMIT: the events of runs MLflow would not have written to are rejected with
 * MLflow's messages (SqlAlchemyStore._get_run, _check_run_is_active and, for a run started
 * in a deleted experiment, _check_experiment_is_active). The statements skipped them.
 */
static void report_run_states(struct writer *w)
{
    const PGresult *res = w->run_states;
    if (res == NULL)
        return;
    const struct batch *b = w->head;
    for (size_t i = w->cur.lo; i < w->cur.hi; i++) {
        const struct ev *ev = &b->evs[i];
        if ((ev->flags & EV_REJECTED) || ev->kind == EV_EXPERIMENT || ev->kind == EV_ARTIFACT_DONE)
            continue;
        int row = 0, rows = PQntuples(res);
        while (row < rows && memcmp(PQgetvalue(res, row, 0), ev_run(b, ev), PROTO_RUN_ID_LEN) != 0)
            row++;
        if (row == rows)
            continue;
        char msg[300];
        uint32_t code = PROTO_ERR_NOT_ACTIVE;
        const char *exp_stage = PQgetvalue(res, row, 3);
        /* A run not made because its experiment is deleted or unknown: its events share the
         * reason (SqlAlchemyStore._get_experiment, _check_experiment_is_active). */
        if (PQgetisnull(res, row, 1) && PQgetisnull(res, row, 2) && !PQgetisnull(res, row, 4)) {
            snprintf(msg, sizeof msg, "No Experiment with id=%s exists", PQgetvalue(res, row, 4));
            code = PROTO_ERR_RUN_NOT_FOUND;
        } else if (PQgetisnull(res, row, 1) && !PQgetisnull(res, row, 3) &&
                   strcmp(exp_stage, "active") != 0)
            snprintf(msg, sizeof msg,
                     "The experiment %s must be in the 'active' state. Current state is %s.",
                     PQgetvalue(res, row, 2), exp_stage);
        else if (!PQgetisnull(res, row, 1))
            snprintf(msg, sizeof msg,
                     "The run %.*s must be in the 'active' state. Current state is %s.",
                     PROTO_RUN_ID_LEN, ev_run(b, ev), PQgetvalue(res, row, 1));
        else {
            snprintf(msg, sizeof msg, "Run with id=%.*s not found", PROTO_RUN_ID_LEN,
                     ev_run(b, ev));
            code = PROTO_ERR_RUN_NOT_FOUND;
        }
        stats.rejected_run_state++;
        reject_ev(w, i, code, msg);
    }
}

static void note_param_changes(struct writer *w, const PGresult *res)
{
    int n = PQntuples(res);
    if (n == 0)
        return;
    w->param_changed = calloc((size_t)n, sizeof *w->param_changed);
    w->param_old = calloc((size_t)n, sizeof *w->param_old);
    if (w->param_changed == NULL || w->param_old == NULL)
        return; /* the change still does not overwrite; only the report is lost */
    for (int r = 0; r < n; r++) {
        size_t i = (size_t)strtoull(PQgetvalue(res, r, 0), NULL, 10);
        if (i < w->cur.lo || i >= w->cur.hi)
            continue;
        w->param_old[w->n_param_changed] = strndup(PQgetvalue(res, r, 1), 200);
        w->param_changed[w->n_param_changed++] = i;
    }
}

static void clear_check(struct writer *w)
{
    for (size_t i = 0; i < PGCONN_CHECK_RESULTS; i++) {
        PQclear(w->check[i]); /* a statement that never answered leaves NULL */
        w->check[i] = NULL;
    }
    w->ncheck = 0;
}

/*
 * trackd's own tables, in order, each made (if missing) by the first connection that can: one
 * simple query each, so PgBouncer's transaction mode runs them. A step that fails is logged
 * with what it costs, and the writer goes on without it until the next connection.
 */
static const struct setup_step {
    enum writer_state state;
    const char *table; /* for conn_lost */
} setup_steps[] = {{W_LEDGER, "trackd_artifacts"}, {W_OWNERS_TABLE, "trackd_run_owners"}};

static bool *setup_ok(struct writer *w, enum writer_state st)
{
    return st == W_LEDGER ? &w->ledger_ok : &w->owners_ok;
}

/* The step of state st failed with res. */
static void setup_failed(struct writer *w, enum writer_state st, const PGresult *res)
{
    *setup_ok(w, st) = false;
    const char *e = PQresultErrorMessage(res);
    if (st == W_LEDGER)
        log_limited(LOG_ERROR,
                    "[%s] cannot create trackd's table trackd_artifacts (or the mlflow_* "
                    "views): %.*s; artifacts are rejected until it exists",
                    w->name, (int)strcspn(e, "\n"), e);
    else
        log_limited(LOG_ERROR,
                    "[%s] cannot create trackd's table trackd_run_owners: %.*s; runs are "
                    "created without an owner, and every run follows the user_id rule%s. Grant "
                    "trackd's role CREATE on the schema (or create the table as its owner)",
                    w->name, (int)strcspn(e, "\n"), e,
                    w->cfg->open_unowned_runs ? " (open_unowned_runs: anyone writes any run)" : "");
}

/* The connection is set up: write, and tell the agent the first time. */
static void setup_done(struct writer *w)
{
    set_state(w, W_IDLE);
    if (!w->announced) {
        w->announced = true;
        if (w->cbs.ready)
            w->cbs.ready(w->ctx, w);
    }
    start_next(w);
}

/* The connection is checked: make what is not known to exist (setup_steps), read the
 * journal's progress once, then write. */
static void setup_next(struct writer *w)
{
    while (w->setup_step < sizeof setup_steps / sizeof setup_steps[0]) {
        const struct setup_step *s = &setup_steps[w->setup_step++];
        bool *ok = setup_ok(w, s->state);
        if (*ok)
            continue;
        *ok = true; /* unless the statement fails */
        set_state(w, s->state);
        const char *sql = s->state == W_LEDGER ? w->ledger_sql : dbobjects_run_owners_table_sql;
        if (!PQsendQuery(w->pg, sql) || flush_out(w) != 0)
            conn_lost(w, s->table);
        return;
    }
    if (!w->progress_loaded && w->journal_id[0]) {
        char q[512];
        snprintf(q, sizeof q,
                 "%s; SELECT lsn, events FROM trackd_journal_progress WHERE journal_id = '%s'",
                 dbobjects_progress_table_sql, w->journal_id);
        set_state(w, W_PROGRESS);
        if (!PQsendQuery(w->pg, q) || flush_out(w) != 0)
            conn_lost(w, "journal progress");
        return;
    }
    setup_done(w);
}

/* One result of the progress query: the CREATE, then the row (if any). */
static void progress_result(struct writer *w, PGresult *res)
{
    ExecStatusType t = PQresultStatus(res);
    if (t == PGRES_FATAL_ERROR) {
        /* Only a missing privilege is for good; anything else (two agents creating the
         * table at once: 23505 or 42P07) is tried again on a new connection. */
        const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        if (st == NULL || strncmp(st, "42", 2) != 0 || strcmp(st, "42P07") == 0) {
            w->progress_ok = false;
            return;
        }
        log_error("[%s] cannot use trackd's table trackd_journal_progress: %.*s; events "
                  "committed just before a crash may be written again at replay. Grant trackd's "
                  "role CREATE on the schema (or create the table as its owner)",
                  w->name, (int)strcspn(PQresultErrorMessage(res), "\n"),
                  PQresultErrorMessage(res));
        w->progress_loaded = true; /* do without, rather than never write */
        w->progress_ok = false;
        return;
    }
    if (t != PGRES_TUPLES_OK)
        return;
    w->progress_loaded = w->progress_ok = true;
    if (PQntuples(res) == 1) {
        w->progress_lsn = strtoull(PQgetvalue(res, 0, 0), NULL, 10);
        w->progress_events = strtoull(PQgetvalue(res, 0, 1), NULL, 10);
        log_info("[%s] journal %s is committed up to record %" PRIu64 " (%" PRIu64 " events of it)",
                 w->name, w->journal_id, w->progress_lsn, w->progress_events);
    }
}

/* The schema check's results are in: serve, or stay away from a database we must not write. */
static void check_done(struct writer *w)
{
    char msg[700];
    struct pgconn_schema found;
    int rc = pgconn_check_results(w->cfg, PQdb(w->pg), w->check, &found, msg, sizeof msg);
    if (rc == 0) {
        pgconn_log_schema(&found);
        w->schema = found;
        w->variant = found.workspace ? BATCH_SCHEMA_WORKSPACE : BATCH_SCHEMA_NAME;
    }
    clear_check(w);
    if (rc != 0) {
        /* Events stay queued (and journaled) until an operator fixes the database. */
        stats.db_schema_errors++;
        log_limited(LOG_ERROR, "[%s] %s; not writing, checking again in %u s", w->name, msg,
                    BACKOFF_MAX_MS / 1000);
        PQfinish(w->pg);
        w->pg = NULL;
        poll_stop(w);
        set_state(w, W_BACKOFF);
        uv_timer_start(&w->timer, backoff_cb, BACKOFF_MAX_MS, 0);
        return;
    }
    w->schema_ok = true;
    w->attempts = 0;
    note_up(w, true);
    /* What the cache knows came from the last server; this may be another one (a failover). */
    owners_clear(&w->owners);
    w->setup_step = 0;
    setup_next(w);
}

static void note_artifacts(struct writer *w, const PGresult *res)
{
    int n = PQntuples(res);
    w->art_ret = calloc((size_t)n * 3 + 1, sizeof *w->art_ret);
    if (w->art_ret == NULL)
        return; /* reported below as rows the database did not return */
    for (int r = 0; r < n; r++)
        for (int f = 0; f < 3; f++)
            w->art_ret[(size_t)r * 3 + (size_t)f] = strdup(PQgetvalue(res, r, f));
    w->n_art_ret = (size_t)n;
}

/* After COMMIT: uploads can start, finished uploads are on record, unknown runs rejected. */
static void report_artifacts(struct writer *w)
{
    if (w->sql.n_arts == 0 && w->sql.n_dones == 0)
        return; /* the common range: metrics only */
    const struct batch *b = w->head;
    for (size_t i = w->cur.lo; i < w->cur.hi; i++) {
        const struct ev *ev = &b->evs[i];
        if (ev->flags & EV_REJECTED)
            continue;
        if (ev->kind == EV_ARTIFACT_DONE) {
            char id[64];
            snprintf(id, sizeof id, "%.*s", (int)ev->done.upload_id.len,
                     batch_sptr(b, ev->done.upload_id));
            w->cbs.artifact_recorded(w->ctx, id);
            continue;
        }
        if (ev->kind != EV_ARTIFACT)
            continue;
        size_t k = 0;
        const struct sref id = ev->artifact.upload_id;
        while (k < w->n_art_ret &&
               (w->art_ret[k * 3] == NULL || strlen(w->art_ret[k * 3]) != id.len ||
                memcmp(w->art_ret[k * 3], batch_sptr(b, id), id.len) != 0))
            k++;
        if (k < w->n_art_ret && w->art_ret[k * 3 + 1] && w->art_ret[k * 3 + 2]) {
            w->cbs.artifact_ready(w->ctx, b, ev, w->art_ret[k * 3 + 1], w->art_ret[k * 3 + 2]);
        } else {
            char msg[128];
            snprintf(msg, sizeof msg, "run '%.*s' does not exist: artifact not uploaded",
                     PROTO_RUN_ID_LEN, ev_run(b, ev));
            stats.rejected_database++;
            reject_ev(w, i, PROTO_ERR_DATABASE, msg);
        }
    }
}

/* Reads every result that has arrived and advances the state. */
static void drive(struct writer *w)
{
    while (w->pg && !PQisBusy(w->pg)) {
        enum writer_state st = w->state;
        if (st == W_PROGRESS) {
            PGresult *res = PQgetResult(w->pg);
            if (res == NULL) {
                if (!w->progress_loaded) {
                    conn_lost(w, "journal progress");
                    return;
                }
                setup_done(w);
                continue;
            }
            progress_result(w, res);
            PQclear(res);
            continue;
        }
        if (st == W_OWNERS) {
            PGresult *res = PQgetResult(w->pg);
            if (res == NULL) {
                owners_done(w);
                continue;
            }
            owners_result(w, res);
            PQclear(res);
            continue;
        }
        if (st == W_LEDGER || st == W_OWNERS_TABLE) {
            PGresult *res = PQgetResult(w->pg);
            if (res == NULL) {
                setup_next(w);
                continue;
            }
            if (PQresultStatus(res) == PGRES_FATAL_ERROR)
                setup_failed(w, st, res);
            PQclear(res);
            continue;
        }
        if (st == W_CHECKING) {
            PGresult *res = PQgetResult(w->pg);
            if (res == NULL) {
                check_done(w);
                continue;
            }
            if (w->ncheck < PGCONN_CHECK_RESULTS)
                w->check[w->ncheck++] = res;
            else
                PQclear(res);
            continue;
        }
        if (st != W_PREPARE && st != W_TXN_START && st != W_PIPELINE && st != W_ROLLBACK)
            return;
        PGresult *res = PQgetResult(w->pg);
        if (st == W_PIPELINE || st == W_PREPARE) {
            if (res == NULL) {
                /* End of one statement's results. */
                if (w->stmt_index >= w->pending_results)
                    return;
                w->stmt_index++;
                continue;
            }
            ExecStatusType t = PQresultStatus(res);
            if (t == PGRES_PIPELINE_SYNC) {
                PQclear(res);
                uint64_t rtt = (uint64_t)util_clock_us(CLOCK_MONOTONIC) - w->sync_sent_us;
                stats.db_rtt_us_last = rtt;
                if (rtt > stats.db_rtt_us_max)
                    stats.db_rtt_us_max = rtt;
                if (!PQexitPipelineMode(w->pg)) {
                    conn_lost(w, "pipeline exit");
                    return;
                }
                if (st == W_PREPARE) {
                    prepare_done(w);
                } else if (w->failed) {
                    send_rollback(w);
                } else {
                    if (w->exit_after_commits && --w->exit_after_commits == 0) {
                        log_error("[%s] TRACKD_TEST_EXIT_AFTER_COMMITS: exiting after a "
                                  "COMMIT, before anything else learns of it",
                                  w->name);
                        _exit(86);
                    }
                    range_committed(w);
                }
                continue;
            }
            bool ok = t == PGRES_TUPLES_OK && !w->failed && w->stmt_index < w->pending_results;
            if (t == PGRES_FATAL_ERROR)
                record_failure(w, res);
            else if (ok && w->stmts[w->stmt_index] == STMT_PARAMS)
                note_param_changes(w, res);
            else if (ok && w->stmts[w->stmt_index] == STMT_RUN_STATE)
                res = note_run_states(w, res);
            else if (ok && w->stmts[w->stmt_index] == STMT_ARTIFACTS)
                note_artifacts(w, res);
            else if (ok && w->stmts[w->stmt_index] == STMT_GUARD && PQntuples(res) > 0)
                w->direct_refused = true;
            PQclear(res);
            continue;
        }
        if (res == NULL) {
            /* The simple query is complete. */
            if (st == W_ROLLBACK) {
                set_state(w, W_IDLE);
                range_failed(w);
            } else if (w->failed) {
                send_rollback(w);
            } else {
                send_pipeline(w);
            }
            continue;
        }
        ExecStatusType t = PQresultStatus(res);
        if (t == PGRES_COPY_IN) {
            PQclear(res);
            set_state(w, W_COPY_DATA);
            send_copy(w);
            return;
        }
        if (t == PGRES_FATAL_ERROR && st != W_ROLLBACK)
            record_failure(w, res);
        PQclear(res);
    }
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    struct writer *w = h->data;
    if (w->poll != h)
        return;
    if (w->state == W_CONNECTING) {
        connect_poll(w);
        return;
    }
    if (w->pg == NULL)
        return;
    if (status < 0) {
        conn_lost(w, writer_state_name(w->state));
        return;
    }
    if (events & UV_WRITABLE) {
        if (w->state == W_COPY_DATA) {
            send_copy(w);
            if (w->state != W_TXN_START)
                return;
        } else if (flush_out(w) != 0) {
            conn_lost(w, writer_state_name(w->state));
            return;
        }
    }
    if (events & UV_READABLE) {
        if (!PQconsumeInput(w->pg)) {
            conn_lost(w, writer_state_name(w->state));
            return;
        }
        if (w->state == W_IDLE) {
            /* Nothing is in flight: readable here means the server hung up. */
            if (PQstatus(w->pg) == CONNECTION_BAD)
                conn_lost(w, "idle");
            return;
        }
    }
    drive(w);
}

/* ---- public -------------------------------------------------------------- */

void writer_journal_durable(struct writer *w)
{
    if (w->state == W_IDLE)
        start_next(w);
}

void writer_set_journal(struct writer *w, const char *id, const uint64_t *durable_lsn)
{
    snprintf(w->journal_id, sizeof w->journal_id, "%s", id);
    w->durable_lsn = durable_lsn;
    w->replay_end = UINT64_MAX;
}

void writer_replay_end(struct writer *w, uint64_t lsn)
{
    w->replay_end = lsn;
}

int writer_init(struct writer *w, unsigned index, uv_loop_t *loop, const struct trackd_config *cfg,
                const struct writer_cbs *cbs, void *ctx)
{
    memset(w, 0, sizeof *w);
    if (index == 0)
        snprintf(w->name, sizeof w->name, "writer");
    else
        snprintf(w->name, sizeof w->name, "writer %u", index);
    w->loop = loop;
    w->cfg = cfg;
    w->cbs = *cbs;
    w->ctx = ctx;
    w->poll_fd = -1;
    const char *exit_after = getenv("TRACKD_TEST_EXIT_AFTER_COMMITS");
    if (exit_after)
        w->exit_after_commits = (unsigned)strtoul(exit_after, NULL, 10);
    batch_sql_init(&w->sql);
    proto_buf_init(&w->owner_ids, SIZE_MAX / 4);
    if (owners_init(&w->owners, cfg->open_unowned_runs) != 0)
        return -ENOMEM;
    /* MLflow's append_to_uri_path: exactly one '/' between root and id. */
    size_t rl = strlen(cfg->artifact_root);
    snprintf(w->artifact_root, sizeof w->artifact_root, "%s%s", cfg->artifact_root,
             rl && cfg->artifact_root[rl - 1] == '/' ? "" : "/");
    /* trackd's own objects: one simple query, so PgBouncer's transaction mode can run it. */
    size_t ll = strlen(dbobjects_ledger_sql), vl = strlen(dbobjects_views_sql);
    w->ledger_sql = malloc(ll + vl + 2);
    if (w->ledger_sql == NULL)
        return -ENOMEM;
    memcpy(w->ledger_sql, dbobjects_ledger_sql, ll + 1);
    if (cfg->seed_views) {
        w->ledger_sql[ll] = ';';
        memcpy(w->ledger_sql + ll + 1, dbobjects_views_sql, vl + 1);
    }
    char msg[512];
    if (pgconn_params_init(&w->params, cfg, msg, sizeof msg) != 0 ||
        pgconn_targets_parse(cfg->pg_dsn, &w->targets, msg, sizeof msg) != 0) {
        log_error("[%s] [postgres] dsn: %s", w->name, msg);
        pgconn_params_clear(&w->params);
        return -EINVAL;
    }
    w->connect_timeout_ms =
        w->targets.timeout_ms ? w->targets.timeout_ms : cfg->pg_connect_timeout_ms;
    uv_timer_init(loop, &w->timer);
    w->timer.data = w;
    return 0;
}

void writer_start(struct writer *w)
{
    connect_start(w);
}

void writer_submit(struct writer *w, struct batch *b)
{
    if (w->state == W_CLOSING) {
        /* Late work during shutdown is handed straight back, unwritten. */
        for (size_t i = 0; i < b->n; i++)
            if (!(b->evs[i].flags & EV_REJECTED))
                w->cbs.reject(w->ctx, b, &b->evs[i], PROTO_ERR_SHUTDOWN,
                              "the agent stopped before this event was written");
        w->cbs.batch_done(w->ctx, b);
        return;
    }
    b->next = NULL;
    if (w->tail)
        w->tail->next = b;
    else
        w->head = b;
    w->tail = b;
    w->queued++;
    if (w->state == W_IDLE)
        start_next(w);
}

bool writer_idle(const struct writer *w)
{
    return w->head == NULL;
}

static void timer_closed_cb(uv_handle_t *h)
{
    struct writer *w = h->data;
    if (w->closed_cb)
        w->closed_cb(w);
}

void writer_close(struct writer *w, void (*closed)(struct writer *))
{
    set_state(w, W_CLOSING);
    w->closed_cb = closed;
    while (w->head) {
        struct batch *b = w->head;
        for (size_t i = 0; i < b->n; i++)
            if (!(b->evs[i].flags & EV_REJECTED))
                w->cbs.reject(w->ctx, b, &b->evs[i], PROTO_ERR_SHUTDOWN,
                              "the agent stopped before this event was written");
        w->head = b->next;
        w->cbs.batch_done(w->ctx, b);
    }
    w->tail = NULL;
    w->queued = 0;
    clear_check(w);
    if (w->pg)
        PQfinish(w->pg);
    w->pg = NULL;
    poll_stop(w);
    clear_range_results(w);
    batch_sql_free(&w->sql);
    owners_free(&w->owners);
    proto_buf_free(&w->owner_ids);
    free(w->stack);
    w->stack = NULL;
    pgconn_params_clear(&w->params);
    if (w->resolving)
        uv_cancel((uv_req_t *)&w->gai); /* resolved_cb still runs, and frees what it got */
    if (w->addrs)
        uv_freeaddrinfo(w->addrs);
    w->addrs = w->addr = NULL;
    pgconn_targets_free(&w->targets);
    free(w->ledger_sql);
    w->ledger_sql = NULL;
    uv_timer_stop(&w->timer);
    uv_close((uv_handle_t *)&w->timer, timer_closed_cb);
}
