/*
 * The agent itself: the modules wired on one libuv loop (listener -> conn -> ingest -> writer,
 * the journal and the artifact spool), the start-up schema check and journal replay, signals,
 * SIGHUP reloads and clean shutdown. main.c is the command line around it.
 */
#include "agent.h"

#include <errno.h>
#include <malloc.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <curl/curl.h>
#include <uv.h>

#include "config.h"
#include "dbobjects.h"
#include "deadletter.h"
#include "conn.h"
#include "identity.h"
#include "ingest.h"
#include "journaldir.h"
#include "journaler.h"
#include "listener.h"
#include "log.h"
#include "pgconn.h"
#include "stats.h"
#include "trackd_proto.h"
#include "uploader.h"
#include "util.h"
#include "writer.h"

extern char **environ;

#define AGENT_THREADPOOL_SIZE "16"
/*
 * glibc serves allocations from this size up with their own mmap, returned to the system when
 * freed. Left alone, it raises the threshold to the size of each such block freed (up to 32 MiB),
 * after which a batch's event array (1.25 MiB at 20,000 rows) comes from the heap, which
 * fragments as batches of different sizes come and go: the agent then held 80 MiB for a
 * 32 MiB pending bound in the bench's W1, against 50 MiB with the threshold fixed.
 */
#define AGENT_MMAP_THRESHOLD (1 << 20)

struct agent {
    uv_loop_t loop;
    struct trackd_config cfg;
    struct writer writers[CONFIG_MAX_WRITERS]; /* [postgres] writer_connections of them */
    unsigned nwriters;
    struct ingest ingest;
    struct conn_server conns;
    struct journaler journal;
    struct deadletter dead;
    struct listener listener;
    struct uploader up;
    uv_signal_t sigterm, sigint, sighup;
    const char *config_path; /* reread at SIGHUP; NULL: built-in defaults */
    uv_timer_t tick;         /* 1 s: rates and uptime */
    uv_timer_t shutdown;     /* polls for drain until the grace period ends */
    uint64_t started_ms;
    uint64_t shutdown_deadline_ms;
    uint64_t last_committed;
    uint64_t replay_log_ms;                 /* last progress line while the replay waits */
    char journal_id[JOURNALDIR_ID_LEN + 1]; /* names the journal's progress row */
    bool replaying;       /* the journal is being replayed; nobody is served yet */
    bool replay_complete; /* every journaled record went through ingest */
    bool stopping;
    bool closing; /* close_modules ran: what writers hand back is not committed */
};

/* ---- callbacks wiring the modules together -------------------------------- */

static void on_reject(void *ctx, const struct batch *b, const struct ev *ev, uint32_t code,
                      const char *message)
{
    struct agent *a = ctx;
    /* A copy's fate is its original's to report (ingest.c). */
    if (ev->flags & EV_SHADOW)
        return;
    /* Not written at shutdown is not rejected: those events stay in the journal. */
    if (code != PROTO_ERR_SHUTDOWN)
        deadletter_event(&a->dead, b, ev, code,
                         code == PROTO_ERR_DATABASE ? a->writers[b->part].fail_state : "", message);
    const struct ev_frame *f = ev_frame(b, ev);
    struct conn *c = conn_find(&a->conns, f->conn_id);
    if (c)
        conn_send_error(c, f->seq, code, message);
    else
        stats.errors_undeliverable++;
    if (ev->kind == EV_ARTIFACT && code != PROTO_ERR_SHUTDOWN) {
        char id[64];
        struct sref upload_id = ev_upload_id(ev);
        snprintf(id, sizeof id, "%.*s", (int)upload_id.len, batch_sptr(b, upload_id));
        uploader_rejected(&a->up, id);
    }
}

/* ---- artifacts: the uploader's requests --------------------------------------- */

static uint64_t on_artifact_ledger(void *ctx, const struct artifact *art)
{
    struct agent *a = ctx;
    /* The identity kept with the spool copy: the run-owner rule holds after a restart too. */
    const struct spool_entry *e = &art->e;
    struct events_origin o = {conn_find(&a->conns, art->conn_id) ? art->conn_id : 0,
                              e->user,
                              "",
                              "",
                              false,
                              0,
                              e->has_peer ? &e->peer : NULL};
    return ingest_artifact(&a->ingest, &o, art->seq, e->run_id, e->path, e->id, e->size, e->sha256);
}

static int on_artifact_record(void *ctx, const struct artifact *art, const char *status,
                              const char *error)
{
    struct agent *a = ctx;
    return ingest_artifact_done(&a->ingest, art->e.id, status, error);
}

static void on_artifact_hold(void *ctx, uint32_t conn_id, uint64_t serial, bool hold)
{
    struct agent *a = ctx;
    if (!hold)
        ingest_unhold(&a->ingest, serial);
    else if (ingest_hold(&a->ingest, conn_id, serial) != 0)
        log_warn("[artifacts] out of memory: a flush may return before serial %llu is uploaded",
                 (unsigned long long)serial);
}

static void on_artifact_taken(void *ctx, const struct artifact *art, int rc, const char *msg)
{
    struct agent *a = ctx;
    struct conn *c = conn_find(&a->conns, art->conn_id);
    if (c)
        conn_artifact_taken(c, art->seq, rc, msg);
}

static void on_artifact_failed(void *ctx, const struct artifact *art, const char *msg, bool tell)
{
    struct agent *a = ctx;
    deadletter_frame(&a->dead, art->conn_id, art->seq, PROTO_ERR_ARTIFACT, msg);
    if (!tell)
        return;
    struct conn *c = art->conn_id ? conn_find(&a->conns, art->conn_id) : NULL;
    if (c)
        conn_send_error(c, art->seq, PROTO_ERR_ARTIFACT, msg);
    else
        stats.errors_undeliverable++;
}

/* ---- the writer's results ------------------------------------------------------ */

static void on_artifact_ready(void *ctx, const struct batch *b, const struct ev *ev,
                              const char *store_uri, const char *status)
{
    struct agent *a = ctx;
    char id[64];
    snprintf(id, sizeof id, "%.*s", (int)ev->artifact.upload_id.len,
             batch_sptr(b, ev->artifact.upload_id));
    uploader_committed(&a->up, id, store_uri, status);
}

static void on_artifact_recorded(void *ctx, const char *id)
{
    struct agent *a = ctx;
    uploader_recorded(&a->up, id);
}

/*
 * A writer is set up for the first time: the next one may start. One at a time, so that two
 * connections never create trackd's tables and views at once (CREATE OR REPLACE VIEW in two
 * sessions fails with "tuple concurrently updated").
 */
static void on_writer_ready(void *ctx, struct writer *w)
{
    struct agent *a = ctx;
    size_t k = (size_t)(w - a->writers);
    /* Also when stopping: its events are to be written within the grace period too. */
    if (k + 1 < a->nwriters && !a->closing)
        writer_start(&a->writers[k + 1]);
}

static void on_batch_done(void *ctx, struct batch *b)
{
    struct agent *a = ctx;
    ingest_batch_done(&a->ingest, b);
}

static void on_pause(void *ctx, bool pause)
{
    struct agent *a = ctx;
    conn_pause_all(&a->conns, pause);
}

static void on_flushed(void *ctx, uint32_t conn_id, uint64_t flush_seq)
{
    struct agent *a = ctx;
    struct conn *c = conn_find(&a->conns, conn_id);
    if (c)
        conn_send_flushed(c, flush_seq);
}

static void on_error(void *ctx, uint32_t conn_id, uint64_t seq, uint32_t code, const char *msg)
{
    struct agent *a = ctx;
    if (code != PROTO_ERR_SHUTDOWN && code != PROTO_ERR_PROTOCOL)
        deadletter_frame(&a->dead, conn_id, seq, code, msg);
    struct conn *c = conn_find(&a->conns, conn_id);
    if (c)
        conn_send_error(c, seq, code, msg);
    else
        stats.errors_undeliverable++;
}

static void on_released(void *ctx, uint64_t lsn)
{
    struct agent *a = ctx;
    /* Closing writers hand back what they did not write: that is not a release, and a journal
     * close still waiting for its worker would act on it. */
    if (a->closing)
        return;
    journaler_release(&a->journal, lsn); /* segments go on a worker: on_journal_room follows */
}

/* Committed segments are gone: clients paused on a full journal may be read again. */
static void on_journal_room(void *ctx)
{
    struct agent *a = ctx;
    if (a->replaying)
        return;
    uint64_t bytes, quota;
    journaler_usage(&a->journal, &bytes, &quota);
    stats.journal_bytes = bytes;
    if (bytes < quota / 10 * 9)
        conn_journal_room(&a->conns);
}

static void on_durable(void *ctx, uint64_t lsn)
{
    struct agent *a = ctx;
    conn_journal_durable(&a->conns, lsn);
    for (unsigned k = 0; k < a->nwriters; k++)
        writer_journal_durable(&a->writers[k]);
}

static void on_stalled(void *ctx, bool stalled)
{
    struct agent *a = ctx;
    conn_journal_stalled(&a->conns, stalled);
}

/* Replay: each journaled frame goes through ingest again, once per session and seq. */
static void on_replayed(void *ctx, const struct frame_origin *o, const struct proto_header *h,
                        const uint8_t *body, uint64_t lsn)
{
    struct agent *a = ctx;
    struct proto_msg m;
    /* A replayed record is on disk: the writer may record progress up to it. */
    if (lsn > a->journal.durable_lsn)
        a->journal.durable_lsn = lsn;
    if (o->session && h->seq <= session_last_seq(&a->conns.sessions, o->session))
        return;
    if (proto_msg_decode(h, body, &m) != 0)
        return;
    session_note(&a->conns.sessions, o->session, h->seq, uv_now(&a->loop));
    struct events_origin io = {0,   o->user, o->source_name, o->source_type, o->context_tags,
                               lsn, o->peer};
    /* The writer the record went to, so that writer's progress row decides whether it is
     * committed. A record of another writer count (or from before writers were journaled)
     * goes by a hash of the run id under this count: the same writer at every replay, as
     * this count's rows are written while the replay commits. */
    int given = o->writers == a->nwriters ? (int)o->writer : INGEST_ROUTE_HASH;
    ingest_message(&a->ingest, &io, &m, ingest_route(&a->ingest, &m, given));
    stats.replayed_frames++;
}

/*
 * Between replayed records: while the replayed events hold more than the pending-memory
 * bound, the loop runs (the writer commits, timers and signals fire) until they fall below
 * half of it, so a journal of any size replays in bounded memory. Nothing else is served
 * yet, so clients' frames still come after the journal's. Non-zero stops the replay.
 */
static int replay_pace(void *ctx)
{
    struct agent *a = ctx;
    size_t limit = a->cfg.max_pending_bytes;
    if (ingest_pending_bytes(&a->ingest) < limit)
        return a->stopping;
    while (!a->stopping && ingest_pending_bytes(&a->ingest) >= limit / 2) {
        ingest_cut(&a->ingest);
        uint64_t now = uv_now(&a->loop);
        if (now - a->replay_log_ms >= 10000) {
            a->replay_log_ms = now;
            log_info("[journal] replay: %llu frames so far, %zu bytes waiting for PostgreSQL "
                     "(writer %s); clients are served once the journal is through",
                     (unsigned long long)stats.replayed_frames, ingest_pending_bytes(&a->ingest),
                     writer_state_name(a->writers[0].state));
        }
        uv_run(&a->loop, UV_RUN_ONCE);
    }
    return a->stopping;
}

/* ---- lifecycle ------------------------------------------------------------- */

static void writer_closed(struct writer *w)
{
    (void)w;
}

static void journal_closed(struct journaler *jr)
{
    (void)jr;
}

/* Closes every module and handle; the loop then runs out. */
static void close_modules(struct agent *a)
{
    a->closing = true;
    uploader_close(&a->up, NULL);
    journaler_close(&a->journal, journal_closed);
    ingest_cut(&a->ingest);
    conn_close_all(&a->conns);
    for (unsigned k = 0; k < a->nwriters; k++)
        writer_close(&a->writers[k], writer_closed);
    ingest_close(&a->ingest);
    uv_timer_stop(&a->tick);
    uv_timer_stop(&a->shutdown);
    uv_close((uv_handle_t *)&a->tick, NULL);
    uv_close((uv_handle_t *)&a->shutdown, NULL);
    uv_close((uv_handle_t *)&a->sigterm, NULL);
    uv_close((uv_handle_t *)&a->sigint, NULL);
    uv_close((uv_handle_t *)&a->sighup, NULL);
}

/* The end of a shutdown: the journal is released as far as it was committed. */
static void finish(struct agent *a)
{
    uint64_t left = stats.queue_events;
    if (!ingest_drained(&a->ingest))
        log_warn("[agent] shutdown grace of %u ms ended with %llu events not written; they stay "
                 "in the journal for the next start",
                 a->cfg.shutdown_grace_ms, (unsigned long long)left);
    else if (!a->replay_complete)
        log_warn("[agent] stopped during the journal replay; the rest is replayed at the next "
                 "start");
    else
        journaler_release(&a->journal, a->journal.appended_lsn); /* everything is committed */
    close_modules(a);
}

static void shutdown_tick(uv_timer_t *t)
{
    struct agent *a = t->data;
    ingest_cut(&a->ingest);
    if (ingest_drained(&a->ingest) || uv_now(&a->loop) >= a->shutdown_deadline_ms) {
        log_info("[agent] drained: %llu events committed in total",
                 (unsigned long long)stats.events_committed);
        finish(a);
    }
}

static void on_signal(uv_signal_t *s, int signum)
{
    struct agent *a = s->data;
    if (a->stopping) {
        log_warn("[agent] second signal: stopping without waiting for the database");
        a->shutdown_deadline_ms = 0;
        return;
    }
    a->stopping = true;
    log_info("[agent] %s: no new connections; writing buffered events (up to %u ms)",
             signum == SIGTERM ? "SIGTERM" : "SIGINT", a->cfg.shutdown_grace_ms);
    a->shutdown_deadline_ms = uv_now(&a->loop) + a->cfg.shutdown_grace_ms;
    if (a->replaying)
        return; /* run_agent sees stopping when the replay returns */
    listener_close(&a->listener);
    conn_drain_all(&a->conns);
    ingest_cut(&a->ingest);
    uv_timer_start(&a->shutdown, shutdown_tick, 0, 20);
}

struct reload {
    struct agent *a;
    const struct trackd_config *next;
};

/* One changed key of a reloaded file: applied if it is safe to, else named for a restart. */
static void reload_key(void *ctx, const char *section, const char *name)
{
    struct reload *r = ctx;
    if (strcmp(section, "agent") == 0 && strcmp(name, "log_level") == 0) {
        r->a->cfg.log_level = r->next->log_level;
        log_set_level(r->next->log_level);
        log_info("[agent] SIGHUP: agent.log_level is now %s",
                 config_log_level_name(r->next->log_level));
        return;
    }
    log_warn("[agent] SIGHUP: %s.%s changed; it takes effect at the next restart", section, name);
}

/*
 * SIGHUP, as PgBouncer: reread the configuration file (and TRACKD_* variables) and apply what
 * is safe to change in a running agent, which is [agent] log_level; every other change is
 * named as waiting for a restart. A file that does not load or check is logged and ignored.
 * The log goes to stderr (journald under systemd), so there is no file to reopen.
 */
static void on_sighup(uv_signal_t *s, int signum)
{
    (void)signum;
    struct agent *a = s->data;
    struct trackd_config next;
    log_info("[agent] SIGHUP: rereading %s",
             a->config_path ? a->config_path : "the built-in defaults and TRACKD_* variables");
    if (agent_load_config(&next, a->config_path) != 0) {
        log_error("[agent] SIGHUP: the configuration does not load (see the line above); "
                  "nothing changed");
        config_free(&next);
        return;
    }
    struct reload r = {a, &next};
    config_diff(&a->cfg, &next, reload_key, &r);
    config_free(&next);
}

static void on_tick(uv_timer_t *t)
{
    struct agent *a = t->data;
    stats.rows_per_sec = stats.events_committed - a->last_committed;
    a->last_committed = stats.events_committed;
    /* Artifact copies give way while events are being written, more while they back up. */
    atomic_store(&a->up.spool.pace_bytes_per_s,
                 spool_pace_rate(stats.rows_per_sec, stats.queue_events, stats.queue_bytes,
                                 a->cfg.max_pending_bytes));
    stats.uptime_s = (uv_now(&a->loop) - a->started_ms) / 1000;
    ingest_tick(&a->ingest);
}

int agent_load_config(struct trackd_config *cfg, const char *path)
{
    struct config_error err;
    char line[1024];
    int rc = config_init(cfg);
    if (rc == 0 && path && (rc = config_load_file(cfg, path, &err)) != 0) {
        config_format_error(&err, line, sizeof line);
        fprintf(stderr, "%s\n", line);
        return rc;
    }
    if (rc == 0 && (rc = config_apply_env(cfg, environ, &err)) != 0) {
        config_format_error(&err, line, sizeof line);
        fprintf(stderr, "%s\n", line);
        return rc;
    }
    if (rc == 0 && (rc = config_check(cfg, line, sizeof line)) != 0)
        fprintf(stderr, "%s: %s\n", path ? path : "configuration", line);
    else if (rc != 0)
        fprintf(stderr, "out of memory reading the configuration\n");
    return rc;
}

/*
 * The database password, wherever it is given, is never printed (see
 * log_add_secret); a DSN libpq cannot parse is refused before it is echoed.
 */
int agent_check_dsn(const struct trackd_config *cfg, const char *config_path)
{
    char why[512];
    log_add_secret(getenv("PGPASSWORD"));
    if (pgconn_dsn_check(cfg->pg_dsn, why, sizeof why) != 0) {
        log_error("[agent] %s: [postgres] dsn is not a usable libpq connection string: %s",
                  config_path ? config_path : "(defaults)", why);
        return -EINVAL;
    }
    return 0;
}

/*
 * The modules on one loop, wired to each other, with signals and timers; nothing is served
 * yet. 0 or -errno with msg.
 */
static int start_modules(struct agent *a, char *msg, size_t msglen)
{
    static const struct writer_cbs wcbs = {on_reject, on_batch_done, on_artifact_ready,
                                           on_artifact_recorded, on_writer_ready};
    static const struct uploader_cbs ucbs = {on_artifact_ledger, on_artifact_record,
                                             on_artifact_hold, on_artifact_taken,
                                             on_artifact_failed};
    static const struct ingest_cbs icbs = {on_pause, on_flushed, on_error, on_released};
    static const struct journaler_cbs jcbs = {on_durable, on_stalled, on_journal_room};
    /*
     * libuv's threadpool (4 threads by default) runs the journal's writes, snapshots, uploads,
     * spool deletes, user-name lookups and host-name resolution. A snapshot stuck on an NFS
     * file or a lookup stuck in LDAP holds a thread; with 16, the journal still finds one.
     * Read by libuv at its first work item, so set before any. An operator's value wins.
     */
    setenv("UV_THREADPOOL_SIZE", AGENT_THREADPOOL_SIZE, 0);
    uv_loop_init(&a->loop);
    a->started_ms = uv_now(&a->loop);
    a->nwriters = a->cfg.pg_writers;
    for (unsigned k = 0; k < a->nwriters; k++) {
        int rc = writer_init(&a->writers[k], k, &a->loop, &a->cfg, &wcbs, a);
        if (rc != 0)
            return util_errorf(msg, msglen, rc, "cannot set up the writer");
    }
    writer_start(&a->writers[0]); /* the others follow it (on_writer_ready) */
    int rc = ingest_init(&a->ingest, &a->loop, &a->cfg, a->writers, a->nwriters, &icbs, a);
    if (rc != 0)
        return util_errorf(msg, msglen, rc, "cannot set up ingest");
    journaler_init(&a->journal, &a->loop, &a->cfg, &jcbs, a);
    if ((rc = conn_server_init(&a->conns, &a->loop, &a->cfg, &a->ingest, msg, msglen)) != 0)
        return rc;
    uv_signal_init(&a->loop, &a->sigterm);
    uv_signal_init(&a->loop, &a->sigint);
    uv_signal_init(&a->loop, &a->sighup);
    a->sigterm.data = a->sigint.data = a->sighup.data = a;
    uv_signal_start(&a->sigterm, on_signal, SIGTERM);
    uv_signal_start(&a->sigint, on_signal, SIGINT);
    uv_signal_start(&a->sighup, on_sighup, SIGHUP);
    uv_timer_init(&a->loop, &a->tick);
    uv_timer_init(&a->loop, &a->shutdown);
    a->tick.data = a->shutdown.data = a;

    /* The journal directory itself is private (0700); the directories above it that it
     * creates are 0755, since /var/lib/trackd also holds the default artifact store, which
     * MLflow readers on the node must reach. */
    if ((rc = util_mkdir_p(a->cfg.journal_dir, 0755, 0700)) != 0)
        return util_errorf(msg, msglen, rc, "cannot create the journal directory %s",
                           a->cfg.journal_dir);
    /* One agent per journal: held (and never closed) for the life of the process. */
    if ((rc = journaldir_lock(a->cfg.journal_dir, msg, msglen)) < 0 ||
        (rc = journaldir_identity(a->cfg.journal_dir, a->journal_id, msg, msglen)) != 0)
        return rc;
    for (unsigned k = 0; k < a->nwriters; k++) {
        /* Each writer's own progress row. The key names the count, so rows written with
         * another one are not read: those events are then written again, idempotently, rather
         * than skipped on another writer's word. */
        char key[64];
        if (a->nwriters == 1)
            snprintf(key, sizeof key, "%s", a->journal_id);
        else
            snprintf(key, sizeof key, "%s/%u/%u", a->journal_id, k, a->nwriters);
        writer_set_journal(&a->writers[k], key, &a->journal.durable_lsn);
    }
    /* Replay may reject events, so the dead-letter file must be open before it. */
    deadletter_open(&a->dead, a->cfg.journal_dir);
    static struct s3_config s3;
    if ((rc = s3_config_init(&s3, a->cfg.s3_endpoint_url, a->cfg.s3_region, a->cfg.s3_access_key_id,
                             a->cfg.s3_secret_file, msg, msglen)) != 0 ||
        (rc = uploader_init(&a->up, &a->loop, &a->cfg, &s3, &ucbs, a, msg, msglen)) != 0)
        return rc;
    a->conns.uploader = &a->up;
    return 0;
}

/*
 * Every journaled frame through ingest again, before anyone is served. 0 when the journal is
 * through, 1 when a signal stopped it, -errno with msg.
 */
static int replay_journal(struct agent *a, char *msg, size_t msglen)
{
    struct journal_replay_stats rs;
    a->replaying = true;
    a->replay_log_ms = 0; /* the first wait is logged at once */
    int rc = journaler_replay(&a->cfg, on_replayed, replay_pace, a, &rs, msg, msglen);
    a->replaying = false;
    if (rc < 0)
        return rc;
    a->replay_complete = rc == 0;
    for (unsigned k = 0; k < a->nwriters; k++)
        writer_replay_end(&a->writers[k], a->journal.durable_lsn);
    if (rs.records || rs.quarantined || rs.torn_tail_bytes)
        log_info("[journal] replayed %llu frames from %llu segments (%llu quarantined, %llu torn "
                 "bytes skipped)%s%s",
                 (unsigned long long)rs.records, (unsigned long long)rs.segments,
                 (unsigned long long)rs.quarantined, (unsigned long long)rs.torn_tail_bytes,
                 rs.last_problem[0] ? ": " : "", rs.last_problem);
    return a->stopping ? 1 : 0;
}

/* Spooled artifacts resume, the journal opens for appending and clients are served. 0 or
 * -errno with msg. */
static int serve(struct agent *a, char *msg, size_t msglen)
{
    int recovered = uploader_recover(&a->up);
    if (recovered > 0)
        log_info("[artifacts] %d spooled artifact(s) from before the restart resume", recovered);
    int rc = journaler_open(&a->journal, msg, msglen);
    if (rc != 0)
        return rc;
    a->conns.journal = &a->journal;
    a->conns.durable_lsn = a->journal.durable_lsn;
    if ((rc = listener_start(&a->listener, &a->loop, &a->cfg, &a->conns, msg, msglen)) != 0)
        return rc;
    uv_timer_start(&a->tick, on_tick, 1000, 1000);
    conn_server_start(&a->conns);
    if (geteuid() == 0)
        log_warn("[agent] running as root; an unprivileged user is enough (see "
                 "agent/systemd/trackd.service)");
    log_info("[agent] ready");
    return 0;
}

/* Runs the loop until every handle is closed, then frees what outlives it. */
static void run_to_end(struct agent *a)
{
    uv_run(&a->loop, UV_RUN_DEFAULT);
    int rc = uv_loop_close(&a->loop);
    if (rc != 0)
        log_warn("[agent] loop closed with handles open: %s", uv_strerror(rc));
    log_info("[agent] stopped");
    conn_server_free(&a->conns);
    deadletter_close(&a->dead);
    config_free(&a->cfg);
}

int agent_run(const char *config_path)
{
    static struct agent a; /* large; lives for the whole process */
    char msg[1024];
    if (agent_load_config(&a.cfg, config_path) != 0)
        return 2;
    log_set_level(a.cfg.log_level);
    if (agent_check_dsn(&a.cfg, config_path) != 0) {
        config_free(&a.cfg);
        return 1;
    }
    a.config_path = config_path;
#ifdef M_MMAP_THRESHOLD
    if (getenv("MALLOC_MMAP_THRESHOLD_") == NULL) /* an operator's glibc tunable wins */
        mallopt(M_MMAP_THRESHOLD, AGENT_MMAP_THRESHOLD);
#endif
    signal(SIGPIPE, SIG_IGN);
    curl_global_init(CURL_GLOBAL_DEFAULT); /* before any thread: it is not thread-safe */
    srand((unsigned)time(NULL) ^ (unsigned)getpid());
    log_info("[agent] trackd %s starting (config %s)", trackd_version,
             config_path ? config_path : "built-in defaults");

    int chk = pgconn_check_schema(&a.cfg, msg, sizeof msg);
    if (chk == PGCONN_CHECK_FAILED) {
        log_error("[agent] %s", msg);
        config_free(&a.cfg);
        return 1;
    }
    if (chk == PGCONN_CHECK_UNREACHABLE)
        log_warn("[agent] %s; starting offline: events are journaled and written once "
                 "PostgreSQL answers",
                 msg);
    if (start_modules(&a, msg, sizeof msg) != 0) {
        log_error("[agent] %s", msg);
        return 1;
    }
    int rc = replay_journal(&a, msg, sizeof msg);
    if (rc < 0) {
        log_error("[agent] %s", msg);
        return 1;
    }
    if (rc > 0) {
        /* A signal came during the replay: write what is queued, within the grace period. */
        ingest_cut(&a.ingest);
        uv_timer_start(&a.shutdown, shutdown_tick, 0, 20);
        run_to_end(&a);
        return 0;
    }
    if (serve(&a, msg, sizeof msg) != 0) {
        log_error("[agent] %s", msg);
        close_modules(&a);
        run_to_end(&a);
        return 1;
    }
    run_to_end(&a);
    return 0;
}
