/*
 * The uploader owns an artifact from the client's call to its last ledger row.
 *
 *   SNAPSHOT -> LEDGER -> QUEUED -> UPLOAD -> RECORD -> FORGET
 *      |  ^                  ^        |
 *      v  |                  |        v
 *   ROOM_WAIT             RETRY_WAIT <-
 *
 * A client hands over a descriptor; a worker copies it into the spool (spool.h) so the client
 * may delete its file and a crash loses nothing; the ledger row "pending" goes to the database
 * through ingest, with the run's artifact_uri; once committed, a worker uploads the spool copy
 * (transports.h, at most UPLOADER_MAX_UPLOADS at once, so the journal's writes always find a
 * thread); the final row ("done" or "failed") follows, and once it is committed the spool copy
 * is deleted. Flush barriers wait for the upload (ingest's holds). Every change of state goes
 * through one setter, which logs it and keeps the counters. The loop never touches file
 * contents; a worker touches only the artifact it was given.
 */
#ifndef TRACKD_UPLOADER_H
#define TRACKD_UPLOADER_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "identity.h"
#include "spool.h"
#include "trackd_proto.h"
#include "transports.h"

#define UPLOADER_MAX_UPLOADS 2
#define UPLOADER_MAX_LIVE 4096         /* snapshotted and not yet recorded as uploaded */
#define UPLOADER_MAX_LIVE_PER_UID 1024 /* of those, from one uid */
/* No room in the spool: the snapshot is tried again after 100 ms, doubling to 5 s (each wait
 * jittered down by up to half, util_backoff_ms). */
#define UPLOADER_SPACE_RETRY_MIN_MS 100
#define UPLOADER_SPACE_RETRY_MAX_MS 5000
/* A store that is down: retried after 1 s, doubling to 60 s, for about 30 minutes. */
#define UPLOADER_RETRY_MIN_MS 1000
#define UPLOADER_RETRY_MAX_MS 60000
#define UPLOADER_MAX_ATTEMPTS 36

/* The states: name, and who holds the artifact meanwhile. */
#define ARTIFACT_STATES(X)                                                                         \
    X(SNAPSHOT, "snapshot")     /* a worker checks the client's file and copies it */              \
    X(ROOM_WAIT, "room-wait")   /* no room in the spool: waits with the client's descriptor */     \
    X(LEDGER, "ledger")         /* spooled; its "pending" row is on its way to the database */     \
    X(QUEUED, "queued")         /* the row is committed: waits for an upload slot */               \
    X(UPLOAD, "upload")         /* a worker uploads it */                                          \
    X(RETRY_WAIT, "retry-wait") /* the store failed: waits for the next attempt */                 \
    X(RECORD, "record")         /* uploaded or given up on: its final row is on its way */         \
    X(FORGET, "forget")         /* a worker deletes the spool copy, then it is freed */

enum artifact_state {
#define ARTIFACT_STATE_ENUM(name, text) ARTIFACT_##name,
    ARTIFACT_STATES(ARTIFACT_STATE_ENUM)
#undef ARTIFACT_STATE_ENUM
};

/* "snapshot", "room-wait", ... */
const char *artifact_state_name(enum artifact_state s);

struct uploader;

struct artifact {
    /* Read-only outside the uploader. */
    struct spool_entry e; /* id, run, path, size, sha256 and the client's identity */
    enum artifact_state state;
    uint32_t conn_id; /* its client's connection; 0 once recovered from the spool */
    uint64_t seq;     /* the client's frame */
    uint64_t serial;  /* ingest serial of its "pending" row: flush barriers wait for it */

    /* Private. */
    struct uploader *up;
    uv_work_t work;
    int fd;                      /* the client's file until snapshotted */
    struct proto_file_seen seen; /* the file at the call, as the client saw it */
    bool waited;                 /* has waited for room in the spool: keeps its place at the head */
    unsigned attempts;           /* uploads tried */
    uint64_t retry_at;           /* loop time of the next attempt, in RETRY_WAIT */
    int rc;                      /* the last worker's result */
    char msg[512];
    char *store_uri;         /* the destination, from QUEUED on */
    char *store_root;        /* a local destination's artifact root (owned), or NULL */
    const char *store_below; /* the rest of a local destination below it, in store_uri */
    struct artifact *next;   /* every live artifact */
    struct artifact *qnext;  /* the queue of its state: ROOM_WAIT, QUEUED or RETRY_WAIT */
};

/* What the uploader asks of the rest of the agent (agent.c wires ingest, conn, deadletter). */
struct uploader_cbs {
    /* Queues a's "pending" ledger row; its ingest serial, or 0 when out of memory. */
    uint64_t (*ledger)(void *ctx, const struct artifact *a);
    /* Queues a's final row: status "done" or "failed" with error. 0 or -ENOMEM. */
    int (*record)(void *ctx, const struct artifact *a, const char *status, const char *error);
    /* Flush barriers of its client (conn_id) covering serial wait for it (hold; again: for
     * another client) or may answer again. */
    void (*hold)(void *ctx, uint32_t conn_id, uint64_t serial, bool hold);
    /* a's frame is answered: 0 taken into the spool, else -errno with the client's sentence. */
    void (*taken)(void *ctx, const struct artifact *a, int rc, const char *msg);
    /* Accepted work failed for good: msg goes to the dead-letter file, and also to a's client
     * when tell (not when taken already carried it). */
    void (*failed)(void *ctx, const struct artifact *a, const char *msg, bool tell);
};

struct uploader {
    uv_loop_t *loop;
    const struct trackd_config *cfg; /* the destinations allowed (destination.h) */
    struct uploader_cbs cbs;
    void *ctx;
    struct spool spool;
    struct transports transports;
    struct artifact *live; /* every artifact the module holds */
    size_t nlive;
    struct artifact *qhead, *qtail; /* QUEUED, in order */
    struct artifact *retry;         /* RETRY_WAIT */
    uv_timer_t retry_timer;
    struct artifact *space_wait; /* ROOM_WAIT, in order */
    uv_timer_t space_timer;
    unsigned space_failures; /* consecutive checks that found no room, for the backoff */
    unsigned running;        /* uploads on worker threads */
    bool closing;
    void (*closed)(struct uploader *);
};

/*
 * Creates the spool below cfg->journal_dir. cfg stays the caller's and is read for every
 * destination ([artifacts] allowed_roots, mlflow.default_artifact_root, mlflow_server_url);
 * s3 (NULL = none) signs s3:// uploads. 0 or -errno with msg. Call curl_global_init first.
 */
int uploader_init(struct uploader *up, uv_loop_t *loop, const struct trackd_config *cfg,
                  const struct s3_config *s3, const struct uploader_cbs *cbs, void *ctx, char *msg,
                  size_t msglen);
/* NULL when path (len bytes) is a safe relative artifact path, else why it is not. */
const char *uploader_path_problem(const char *path, size_t len);

/* The client frame an artifact comes from. */
struct artifact_origin {
    uint32_t conn_id;
    uint64_t session; /* with seq, names the artifact: a resend is recognised */
    uint64_t seq;
    const struct peer *peer; /* the client's identity, kept with the spool copy */
    const char *user;
};
/*
 * Takes fd and starts copying it into the spool (SNAPSHOT); *out is the new artifact. Refused
 * at once, with fd closed: -EEXIST when this frame's artifact is already held (a resend),
 * -ENOBUFS at the agent's limit, -EDQUOT at the limit of the peer's uid
 * (UPLOADER_MAX_LIVE_PER_UID), -EAGAIN when no worker can be queued. The rest is answered
 * through cbs.taken: 0; -EEXIST the spool holds it from before a restart; -EBADF not a regular
 * file; -EFBIG not even an empty spool would hold it (uploader_refused tells these refusals
 * from failures); -ESTALE the file is not what the client saw at the call (seen: size and
 * mtime). A copy that does not fit now (a full disk) waits for room (ROOM_WAIT), retried with
 * backoff, and taken reports it once made.
 */
int uploader_snapshot(struct uploader *up, const struct artifact_origin *o, const char *run_id,
                      struct proto_str path, const struct proto_file_seen *seen, int fd,
                      struct artifact **out);
/* A taken() result that refuses the frame rather than fails accepted work: nothing to
 * dead-letter (-EEXIST is a resend, already held). */
static inline bool uploader_refused(int rc)
{
    return rc == -EEXIST || rc == -EBADF || rc == -EFBIG;
}
/* At start: every artifact the spool holds goes to LEDGER, with no client. The number, or
 * -errno when the spool cannot be read. */
int uploader_recover(struct uploader *up);

/*
 * The writer committed id's ledger row. status "pending": upload to store_uri (the run's
 * artifact_uri + path), if the operator allows that destination, else it fails with the
 * reason. "done" or "failed": that happened before a restart; only the spool copy is left.
 */
void uploader_committed(struct uploader *up, const char *id, const char *store_uri,
                        const char *status);
/* The writer committed id's final row: the spool copy goes. */
void uploader_recorded(struct uploader *up, const char *id);
/* The writer rejected id's ledger row (its error went to the client): the artifact goes. */
void uploader_rejected(struct uploader *up, const char *id);
struct artifact *uploader_find(struct uploader *up, const char *id);

/*
 * Stops starting work; running workers finish and their artifacts stay in the spool.
 * closed runs once the module's timer handles are closed.
 */
void uploader_close(struct uploader *up, void (*closed)(struct uploader *));

#endif
