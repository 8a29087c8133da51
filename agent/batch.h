/*
 * Batches of validated events and the statement payloads built from them.
 * A batch holds events in arrival order with their strings in one arena; the
 * writer commits any contiguous range of it as one transaction, which is what
 * lets it split a failing batch without reordering a run's start before its
 * metrics. Everything here is plain data and plain functions, tested without
 * a loop or a database.
 */
#ifndef TRACKD_BATCH_H
#define TRACKD_BATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "identity.h"
#include "trackd_proto.h"

/* A string stored in a batch's arena. */
struct sref {
    uint32_t off;
    uint32_t len;
};

/* The kinds of event, with the name logs and the dead-letter file give them. */
#define EV_KINDS(X)                                                                                \
    X(EXPERIMENT, "experiment")                                                                    \
    X(START_RUN, "start_run")                                                                      \
    X(METRIC, "metric")                                                                            \
    X(PARAM, "param")                                                                              \
    X(TAG, "tag")                                                                                  \
    X(END_RUN, "end_run")                                                                          \
    X(DELETE_TAG, "delete_tag")                                                                    \
    X(ARTIFACT, "artifact")           /* the artifact's ledger row */                              \
    X(ARTIFACT_DONE, "artifact_done") /* its update: uploaded or failed */

enum ev_kind {
#define EV_KIND_ENUM(name, text) EV_##name,
    EV_KINDS(EV_KIND_ENUM)
#undef EV_KIND_ENUM
        EV_KIND_COUNT
};

/* "metric", "start_run", ...; "unknown" outside the enum. */
const char *ev_kind_name(int kind);

enum ev_flag {
    EV_REJECTED = 1,    /* resolved (an error, or EV_COMMITTED_BEFORE); skipped by later attempts */
    EV_KEEP_STATUS = 2, /* EV_END_RUN leaves the status as stored */
    EV_KEEP_END = 4,    /* EV_END_RUN leaves the end time as stored */
    EV_COMMITTED_BEFORE = 8, /* replayed, and the journal's progress row says it is committed */
    EV_SHADOW = 16 /* a copy of an EV_EXPERIMENT for another writer (ingest.c): not counted, and
                      its errors are the original's to report */
};

enum run_status { RUN_RUNNING, RUN_SCHEDULED, RUN_FINISHED, RUN_FAILED, RUN_KILLED };

const char *run_status_name(int status);

/*
 * Where a frame's events came from, kept once for all of them (a frame of points is one run's,
 * from one client, in one journal record).
 */
struct ev_frame {
    uint64_t seq;     /* the frame's number in its connection */
    uint64_t lsn;     /* journal record it came from (0: none) */
    uint32_t conn_id; /* origin, for errors */
    uint16_t peer;    /* who sent it: 1 + index into the batch's peers; 0 = not checked */
    char run_id[PROTO_RUN_ID_LEN]; /* zeroes when the frame names no run */
};

/*
 * One event, 64 bytes. Its strings live in the batch's arena, its origin in the batch's frames
 * and its numbers in the event, each named by kind; str[] is the same strings in order, for
 * code that treats every kind alike.
 */
struct ev {
    uint8_t kind;
    uint8_t flags;
    uint8_t is_nan;  /* EV_METRIC */
    uint8_t status;  /* EV_END_RUN: enum run_status */
    uint32_t frame;  /* index into the batch's frames */
    uint64_t serial; /* agent-wide arrival order */
    union {
        struct sref str[3];
        struct {
            struct sref name, location; /* location "" = the default root */
        } experiment;                   /* EV_EXPERIMENT */
        struct {
            struct sref experiment, name, user; /* experiment: its name, if not by id */
        } run;                                  /* EV_START_RUN */
        struct {
            struct sref key, value;
        } kv; /* EV_METRIC (key), EV_PARAM, EV_TAG, EV_DELETE_TAG (key) */
        struct {
            struct sref path, upload_id, sha256;
        } artifact; /* EV_ARTIFACT */
        struct {
            struct sref status, upload_id, error;
        } done; /* EV_ARTIFACT_DONE */
    };
    union {
        struct {
            double value; /* sanitised: NaN as 0 with is_nan */
            int64_t ts;   /* ms since the epoch */
            int64_t step;
        } point; /* EV_METRIC */
        struct {
            int64_t ms;            /* start time */
            int64_t experiment_id; /* + 1; 0 = by name (run.experiment) */
        } start;                   /* EV_START_RUN */
        int64_t end_ms;            /* EV_END_RUN */
        uint64_t size;             /* EV_ARTIFACT, bytes */
    };
};

/* The upload id of an EV_ARTIFACT or EV_ARTIFACT_DONE event. */
static inline struct sref ev_upload_id(const struct ev *ev)
{
    return ev->kind == EV_ARTIFACT ? ev->artifact.upload_id : ev->done.upload_id;
}

/* A client identity events of the batch carry (agent/identity.h), with its user name. */
struct batch_peer {
    struct peer id;
    struct sref user;
};

#define BATCH_PEERS_MAX UINT16_MAX

struct batch {
    struct ev *evs;
    size_t n;
    size_t cap;
    size_t max_rows; /* evs never grows past this many (0: no limit): a full batch has no slack */
    struct ev_frame *frames;
    size_t nframes, capframes;
    struct batch_peer *peers;
    size_t npeers, cappeers;
    char *arena;
    size_t alen;
    size_t acap;
    size_t n_metrics;
    uint64_t opened_ms;
    unsigned part;      /* the writer it goes to (ingest.c) */
    struct batch *next; /* writer queue link */
};

void batch_init(struct batch *b);
void batch_free(struct batch *b);
/* Memory the batch holds, for the pending-bytes bound. */
size_t batch_bytes(const struct batch *b);
/*
 * Starts a frame: the events pushed after it came from frame seq of connection conn_id (journal
 * record lsn; 0: none), sent by peer (batch_peer; 0: not checked), about run_id
 * (PROTO_RUN_ID_LEN bytes; NULL: no run). Returns 0 or -ENOMEM.
 */
int batch_frame(struct batch *b, uint32_t conn_id, uint64_t seq, uint64_t lsn, uint16_t peer,
                const char *run_id);
/* Appends a zeroed event of the current frame (batch_frame; an empty one if none was started)
 * and returns it, or NULL when out of memory. */
struct ev *batch_push(struct batch *b, int kind);
/* Where ev came from. */
static inline const struct ev_frame *ev_frame(const struct batch *b, const struct ev *ev)
{
    return &b->frames[ev->frame];
}
/* The run ev names (PROTO_RUN_ID_LEN bytes, not NUL-terminated). */
static inline const char *ev_run(const struct batch *b, const struct ev *ev)
{
    return b->frames[ev->frame].run_id;
}
/* Copies s into the arena; returns -ENOMEM. The event pointer may move: call before batch_push. */
int batch_str(struct batch *b, const char *s, size_t len, struct sref *out);
/* The bytes of s; an empty string when the batch holds no strings yet (arena NULL). */
static inline const char *batch_sptr(const struct batch *b, struct sref s)
{
    return b->arena ? b->arena + s.off : "";
}
/*
 * The frame peer value (batch_frame) for peer p named user: an existing entry with the same
 * identity and name, else a new one. Returns 1.., or 0 when out of memory or at BATCH_PEERS_MAX
 * (the caller cuts the batch and tries again).
 */
uint16_t batch_peer(struct batch *b, const struct peer *p, const char *user);
/* The peer of ev, or NULL when its frame's peer is 0. */
static inline const struct batch_peer *batch_ev_peer(const struct batch *b, const struct ev *ev)
{
    uint16_t peer = b->frames[ev->frame].peer;
    return peer ? &b->peers[peer - 1] : NULL;
}

/*
 * The statement inputs for one range of a batch. Array parameters are text
 * literals ("{...}", NUL-terminated); copy is a binary COPY stream of
 * BATCH_METRIC_COLUMNS rows, one per distinct point (for the staging table or, on the
 * direct path, metrics itself). Rejections found while building (a param logged twice in
 * the range with different values) are flagged on the events and listed.
 */
struct batch_sql {
    struct proto_buf exp_names, exp_locations; /* location "" = the default root */
    size_t n_exps;

    struct proto_buf run_ids, run_names, run_users, run_starts, run_exps, run_exp_ids;
    size_t n_runs;
    /* Who sent each start of run_ids that came from a peer: the trackd_run_owners row the run
     * gets if the start creates it. */
    struct proto_buf own_runs, own_uids, own_gids;
    size_t n_owns;

    struct proto_buf tag_keys, tag_values, tag_runs;
    size_t n_tags;
    struct proto_buf rename_runs, rename_values;
    size_t n_renames;
    struct proto_buf del_runs, del_keys;
    size_t n_dels;

    struct proto_buf param_keys, param_values, param_runs, param_ords;
    size_t n_params;

    struct proto_buf end_runs, end_statuses, end_times;
    size_t n_ends;

    struct proto_buf art_ids, art_runs, art_paths, art_sizes, art_shas;
    size_t n_arts;
    struct proto_buf done_ids, done_statuses, done_errors;
    size_t n_dones;

    /* Every run the range names once, with the experiment name where the range starts it. */
    struct proto_buf state_runs, state_exps, state_exp_ids;
    size_t n_state_runs;

    struct proto_buf copy;
    size_t n_metrics;
    /* latest_metrics: one winner per (run, key) of the range, by MLflow's rule (batch.c). */
    struct proto_buf latest_keys, latest_values, latest_ts, latest_steps, latest_nans, latest_runs;
    size_t n_latest;

    size_t *rejected; /* event indexes flagged while building */
    size_t n_rejected;
};

void batch_sql_init(struct batch_sql *s);
void batch_sql_free(struct batch_sql *s);
/*
 * Builds the inputs for events [lo, hi) of b, skipping rejected ones. Tag values longer than
 * tag_value_max code points (the database's tags.value, pgconn_schema) keep their first
 * tag_value_max, as MLflow 2.16 cuts them to its 5000.
 */
int batch_sql_build(struct batch *b, size_t lo, size_t hi, unsigned tag_value_max,
                    struct batch_sql *s);

/*
 * How the database keys experiments: by name alone (MLflow before 3.10), or by name within a
 * workspace (MLflow 3.10 on: trackd writes workspace 'default'). Statements that name
 * experiments come in both forms; pgconn's schema check says which one a database takes.
 */
enum batch_schema { BATCH_SCHEMA_NAME, BATCH_SCHEMA_WORKSPACE, BATCH_SCHEMA_COUNT };

/* SQL texts the writer sends; $n match the batch_sql arrays above. */
/* The columns of batch_sql.copy's rows, in order. */
#define BATCH_METRIC_COLUMNS "(key, value, \"timestamp\", run_uuid, step, is_nan)"
/* BEGIN, the staging table, and COPY into it (batch_sql_metrics moves the rows on). */
extern const char batch_sql_begin_copy[];
/* $1 state_runs; returns those missing from runs or not active. */
extern const char batch_sql_direct_guard[];
/* COPY of batch_sql.copy straight into metrics. */
extern const char batch_sql_direct_copy[];
/* $1 names, $2 artifact root with '/', $3 now ms, $4 locations */
extern const char *const batch_sql_experiments[BATCH_SCHEMA_COUNT];
extern const char *const batch_sql_runs[BATCH_SCHEMA_COUNT];
/* batch_sql_runs and the trackd_run_owners rows of the runs it creates: $7 own_runs,
 * $8 own_uids, $9 own_gids, $10 now ms. */
extern const char *const batch_sql_runs_owned[BATCH_SCHEMA_COUNT];
/* $1 state_runs, $2 state_exps, $3 state_exp_ids; returns run, run stage, experiment id,
 * experiment stage, the experiment id asked for */
extern const char *const batch_sql_run_state[BATCH_SCHEMA_COUNT];
extern const char batch_sql_tags[];
extern const char batch_sql_renames[];
extern const char batch_sql_params[];
/* $1 state_runs */
extern const char batch_sql_metrics[];
/* $1 keys, $2 values, $3 timestamps, $4 steps, $5 is_nan, $6 runs: the range's winners */
extern const char batch_sql_latest[];
extern const char batch_sql_end_runs[];
extern const char batch_sql_delete_tags[];
/* $1 ids, $2 runs, $3 paths, $4 sizes, $5 sha256, $6 now ms; returns id, store_uri, status */
extern const char batch_sql_artifacts[];
/* $1 ids, $2 statuses, $3 errors, $4 now ms */
extern const char batch_sql_artifacts_done[];

/* Appends s as one element of a text array literal (quoted and escaped). */
int batch_array_append(struct proto_buf *arr, const char *s, size_t len);
/* Appends an SQL NULL element. */
int batch_array_append_null(struct proto_buf *arr);
/* Closes a text array literal: "{" ... "}" and a NUL. */
int batch_array_finish(struct proto_buf *arr);

#endif
