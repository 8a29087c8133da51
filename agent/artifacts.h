/*
 * Artifacts: files clients hand over as descriptors. Each one is first copied into the
 * spool (`<journal dir>/artifacts`: <id>.data plus a <id>.meta line, both fsynced) on a
 * worker thread, so the client may delete its file and a crash loses nothing; then, once
 * its ledger row is committed with the run's artifact_uri, uploaded to the store on a
 * worker thread (at most ARTIFACTS_MAX_UPLOADS at once, so the journal's writes always
 * find a thread); the spool copy goes when the ledger records the upload. The loop never
 * touches file contents.
 */
#ifndef TRACKD_ARTIFACTS_H
#define TRACKD_ARTIFACTS_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "s3.h"
#include "identity.h"
#include "trackd_proto.h"

#define ARTIFACTS_MAX_UPLOADS 2
#define ARTIFACTS_MAX_LIVE 4096         /* snapshotted and not yet recorded as uploaded */
#define ARTIFACTS_MAX_LIVE_PER_UID 1024 /* of those, from one uid */
#define ARTIFACT_PATH_MAX 1024
/* Free space the spool leaves on its file system (for the journal), in bytes; on a file
 * system smaller than 8 GiB, an eighth of it. */
#define ARTIFACTS_SPOOL_RESERVE (1024ull * 1024 * 1024)
/* No room in the spool: the snapshot is tried again after 100 ms, doubling to 5 s (each wait
 * jittered down by up to half, util_backoff_ms). */
#define ARTIFACTS_SPACE_RETRY_MIN_MS 100
#define ARTIFACTS_SPACE_RETRY_MAX_MS 5000
/* A store that is down: retried after 1 s, doubling to 60 s, for about 30 minutes. */
#define ARTIFACTS_RETRY_MIN_MS 1000
#define ARTIFACTS_RETRY_MAX_MS 60000
#define ARTIFACTS_MAX_ATTEMPTS 36

struct trackd_config;
struct artifacts;

struct artifact {
    /* Identity and what the snapshot found; read-only for the owner. */
    char id[40]; /* "<session hex>-<seq hex>": unique per client frame */
    char run_id[PROTO_RUN_ID_LEN + 1];
    char path[ARTIFACT_PATH_MAX + 1];
    char sha256[65];
    uint64_t size;
    bool has_peer; /* false: recovered from a spool record that predates peers */
    struct peer peer;
    char user[64];
    /* The owner's. */
    uint32_t conn_id;
    uint64_t seq;
    uint64_t serial; /* ingest serial of its ledger event: flush barriers wait for it */

    /* Private. */
    struct artifacts *ar;
    uv_work_t work;
    int fd;                      /* the client's file until snapshotted */
    struct proto_file_seen seen; /* the file at the call, as the client saw it */
    bool uploading;
    bool waited;       /* has waited for room in the spool: keeps its place at the head */
    unsigned attempts; /* uploads tried */
    uint64_t retry_at; /* loop time of the next attempt, while waiting */
    int rc;
    char msg[512];
    char *store_uri;         /* the destination, while uploading */
    char *store_root;        /* a local destination's artifact root (owned), or NULL */
    const char *store_below; /* the rest of a local destination below it, in store_uri */
    struct artifact *next, *qnext;
};

struct artifacts_cbs {
    /* The snapshot is durable (rc 0) or failed (-errno, msg says why). */
    void (*snapshotted)(void *ctx, struct artifact *a, int rc, const char *msg);
    /* The upload finished (rc 0) or failed (-errno, msg says why). */
    void (*uploaded)(void *ctx, struct artifact *a, int rc, const char *msg);
};

struct artifacts {
    uv_loop_t *loop;
    struct artifacts_cbs cbs;
    void *ctx;
    char spool[4096];
    char mlflow_server[1024]; /* for mlflow-artifacts: URIs without a host */
    struct s3_config s3;
    struct artifact *live; /* every artifact the module holds */
    size_t nlive;
    struct artifact *qhead, *qtail; /* uploads waiting for a slot */
    struct artifact *retry;         /* uploads waiting for their next attempt (qnext) */
    uv_timer_t retry_timer;
    struct artifact *space_wait; /* snapshots waiting for room in the spool (qnext), in order */
    uv_timer_t space_timer;
    unsigned space_failures; /* consecutive checks that found no room, for the backoff */
    unsigned running;        /* uploads on worker threads */
    bool closing;
    void (*closed)(struct artifacts *);
};

/*
 * Creates the spool directory. mlflow_server ("" = none) serves mlflow-artifacts: URIs
 * that name no host; s3 (NULL = none) signs s3:// uploads. Returns 0 or -errno with msg.
 * Call curl_global_init first.
 */
int artifacts_init(struct artifacts *ar, uv_loop_t *loop, const char *journal_dir,
                   const char *mlflow_server, const struct s3_config *s3,
                   const struct artifacts_cbs *cbs, void *ctx, char *msg, size_t msglen);
/* NULL when path is a safe relative artifact path, else why it is not. */
const char *artifacts_path_problem(const char *path, size_t len);
/*
 * Takes fd and starts copying it into the spool; *out is the new artifact. Refused at once,
 * with fd closed: -EEXIST when this frame's artifact is already held (a resend), -ENOBUFS at
 * the agent's limit, -EDQUOT at the limit of peer's uid (ARTIFACTS_MAX_LIVE_PER_UID). What
 * needs the disk is the worker's, and comes back through snapshotted: -EEXIST (the spool
 * holds it from before a restart), -EBADF (not a regular file), -EFBIG (not even an empty
 * spool would hold it; artifacts_refused() tells these refusals from failures), -ESTALE (the
 * file is not what the client saw at the call: seen, size and mtime). A copy that does not fit
 * now (a full disk) waits for room, retried with backoff, and snapshotted reports it once made.
 */
struct artifact_origin {
    uint32_t conn_id;
    uint64_t session; /* with seq, names the artifact: a resend is recognised */
    uint64_t seq;
    const struct peer *peer; /* the client's identity, kept with the spool copy */
    const char *user;
};
int artifacts_snapshot(struct artifacts *ar, const struct artifact_origin *o, const char *run_id,
                       struct proto_str path, const struct proto_file_seen *seen, int fd,
                       struct artifact **out);
struct artifact *artifacts_find(struct artifacts *ar, const char *id);
/*
 * Queues the upload of a to store_uri (the full destination URI, allowed: destination.h). A
 * local destination names the artifact root it is below (local_root) and below points to the
 * rest in store_uri: nothing below the root is followed if it is a symbolic link. local_root
 * is NULL for every other store.
 */
void artifacts_upload(struct artifacts *ar, struct artifact *a, const char *store_uri,
                      const char *local_root, const char *below);
/* A snapshotted result that refuses the frame rather than fails accepted work: nothing to
 * dead-letter (-EEXIST is a resend, already held). */
static inline bool artifacts_refused(int rc)
{
    return rc == -EEXIST || rc == -EBADF || rc == -EFBIG;
}
/* Deletes a's spool files (on a worker thread) and frees it. */
void artifacts_forget(struct artifacts *ar, struct artifact *a);
/* At start: each spooled artifact (with no client) goes to cb, in no particular order. */
int artifacts_recover(struct artifacts *ar, void (*cb)(void *ctx, struct artifact *a), void *ctx);
/*
 * Stops starting work; running workers finish and their artifacts stay in the spool.
 * closed runs once the module's timer handle is closed.
 */
void artifacts_close(struct artifacts *ar, void (*closed)(struct artifacts *));

#endif
