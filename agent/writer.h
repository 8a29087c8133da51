/*
 * The database writer: one non-blocking libpq connection driven by uv_poll,
 * committing queued batches one transaction per range: COPY of metric rows
 * into a staging table, then the run, tag, param, metric, latest_metrics and
 * end-run statements in one pipeline. SQLSTATE classes decide between retry
 * (with backoff, reconnecting if needed, without limit) and, for class 22 and
 * 23 only, splitting the range until the rows the database rejects are isolated.
 */
#ifndef TRACKD_WRITER_H
#define TRACKD_WRITER_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "batch.h"
#include "owners.h"
#include "pgconn.h"

struct trackd_config;
struct writer;

struct writer_cbs {
    /* An event will not be written; code is a proto_error_code. */
    void (*reject)(void *ctx, const struct batch *b, const struct ev *ev, uint32_t code,
                   const char *message);
    /* Every event of b is committed or rejected; the callee takes b back. */
    void (*batch_done)(void *ctx, struct batch *b);
    /* An EV_ARTIFACT's ledger row is committed: upload to store_uri (status "pending"),
     * or nothing more to do ("done"). */
    void (*artifact_ready)(void *ctx, const struct batch *b, const struct ev *ev,
                           const char *store_uri, const char *status);
    /* An EV_ARTIFACT_DONE's ledger update is committed. */
    void (*artifact_recorded)(void *ctx, const char *upload_id);
    /* w is set up (trackd's tables made) for the first time, and about to write; may be NULL. */
    void (*ready)(void *ctx, struct writer *w);
};

enum writer_state {
    W_DISCONNECTED,
    W_RESOLVING,    /* looking up the current host's addresses */
    W_CONNECTING,   /* libpq connecting to one address */
    W_CHECKING,     /* schema check sent on a new connection */
    W_LEDGER,       /* creating trackd's own tables if missing */
    W_OWNERS_TABLE, /* creating trackd_run_owners if missing */
    W_PROGRESS,     /* reading the journal's progress row (once per process) */
    W_IDLE,
    W_OWNERS,    /* looking up the owners of the next range's runs (agent/owners.h) */
    W_PREPARE,   /* direct path: BEGIN, runs and the guard sent in a pipeline (writer.c) */
    W_TXN_START, /* BEGIN (and COPY start / end) results pending */
    W_COPY_DATA, /* streaming COPY rows */
    W_PIPELINE,  /* statements and COMMIT sent, results pending */
    W_ROLLBACK,
    W_BACKOFF,
    W_CLOSING
};

struct range {
    size_t lo;
    size_t hi;
    bool staging; /* through the staging table even if the points could go straight in */
};

struct writer {
    char name[24]; /* in log lines: "writer", "writer 1", ... */
    uv_loop_t *loop;
    const struct trackd_config *cfg;
    struct writer_cbs cbs;
    void *ctx;
    enum writer_state state;

    PGconn *pg;
    uv_poll_t *poll; /* owned; freed in its close callback */
    int poll_fd;
    int poll_events;
    uv_timer_t timer; /* backoff and connect timeout */
    struct pgconn_params params;
    struct pgconn_targets targets; /* the DSN's hosts, tried in turn */
    size_t target_i;
    struct addrinfo *addrs, *addr; /* the current host's addresses (owned), the one tried */
    char addr_text[64];            /* addr as text, libpq's hostaddr */
    uv_getaddrinfo_t gai;
    bool resolving;              /* gai is in the thread pool */
    unsigned connect_timeout_ms; /* per address */
    char cycle_errors[1024];     /* why each address of this connect cycle failed */
    char artifact_root[512];

    struct batch *head, *tail; /* queue; head is in progress */
    size_t queued;
    struct range *stack; /* ranges still to commit for head, top last */
    size_t nstack, capstack;
    bool head_started; /* the head batch's first range was pushed */
    struct range cur;
    struct batch_sql sql;
    size_t copy_sent;
    bool direct;         /* the range's points go straight into metrics (writer.c) */
    bool direct_refused; /* the direct guard named a run: the range takes the staging path */
    uint64_t replay_end; /* events of journal records up to here were replayed */
    int pending_results; /* statements sent in the pipeline */
    uint8_t stmts[16];   /* which statement each is (enum stmt in writer.c) */
    int stmt_index;
    bool failed;
    char fail_state[6];
    char fail_msg[512];
    size_t *param_changed; /* event indexes, reported after COMMIT succeeds */
    char **param_old;
    size_t n_param_changed;
    PGresult *run_states; /* runs of the range not to write to (batch_sql_run_state), or NULL */
    struct owners owners; /* who may write which run */
    struct proto_buf owner_ids; /* the runs being looked up */
    char **art_ret;             /* ledger rows returned: id, store_uri, status triples */
    size_t n_art_ret;
    bool ledger_ok;
    bool owners_ok; /* trackd_run_owners exists (or is being made) */
    /* Exactly once across crashes: each transaction records, in trackd_journal_progress, how
     * far the journal is committed: every record below lsn, and the first `events` events
     * of record lsn. Read once before the first write; events it covers are not written again. */
    char journal_id[64];         /* the progress row's key; "" = no journal: nothing recorded */
    const uint64_t *durable_lsn; /* the journal's; progress never passes it */
    bool progress_loaded;
    bool progress_ok;                       /* the table exists and answered */
    uint64_t progress_lsn, progress_events; /* committed */
    uint64_t range_lsn, range_events;       /* what the range in flight records, 0 = none */
    unsigned exit_after_commits;            /* TRACKD_TEST_EXIT_AFTER_COMMITS, tests only */
    char *ledger_sql; /* trackd_artifacts, and the mlflow_* views when configured */
    PGresult *check[PGCONN_CHECK_RESULTS]; /* schema check results so far */
    size_t ncheck;
    bool schema_ok;              /* a check passed since the agent started */
    bool up;                     /* counted in stats.db_connections */
    bool announced;              /* cbs.ready was called */
    struct pgconn_schema schema; /* what the last passed check found */
    enum batch_schema variant;   /* the statements that fit it */
    unsigned attempts;           /* consecutive failures, for backoff */
    unsigned setup_step;         /* the next of writer.c's setup_steps on this connection */
    uint64_t sync_sent_us;
    void (*closed_cb)(struct writer *);
};

/*
 * Sets w up without touching the network: the DSN is parsed (-EINVAL, logged, when libpq cannot
 * take it), nothing is connected. index names it in the log: "[writer]" for 0, "[writer 2]"
 * for 2. Returns 0, -EINVAL or -ENOMEM.
 */
int writer_init(struct writer *w, unsigned index, uv_loop_t *loop, const struct trackd_config *cfg,
                const struct writer_cbs *cbs, void *ctx);
/* Starts connecting (resolving the host off the loop first); batches may be submitted before. */
void writer_start(struct writer *w);
/*
 * Names the row of trackd_journal_progress this writer records its journal's progress in (key:
 * the journal's id, or the id and the writer's share, at most 63 bytes) and where the journal's
 * durable LSN is kept. Call before the first connection completes. Until writer_replay_end,
 * every journaled event counts as replayed (it may be stored already).
 */
void writer_set_journal(struct writer *w, const char *id, const uint64_t *durable_lsn);
/* The start-up replay read the journal up to record lsn: later records are new. */
void writer_replay_end(struct writer *w, uint64_t lsn);
/* The journal's durable LSN moved: a batch waiting for it may be written now. */
void writer_journal_durable(struct writer *w);
/* Queues b (takes ownership) and starts work if idle. */
void writer_submit(struct writer *w, struct batch *b);
/* True when nothing is queued or in flight. */
bool writer_idle(const struct writer *w);
const char *writer_state_name(enum writer_state s);
/*
 * Stops: closes the connection and handles; batches still queued are
 * handed back through batch_done with their events unwritten first being
 * rejected with PROTO_ERR_SHUTDOWN. closed runs once every handle is closed.
 */
void writer_close(struct writer *w, void (*closed)(struct writer *));

#endif
