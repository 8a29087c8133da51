/*
 * The journal on the event loop: client frames are appended to the open block on the loop
 * thread, blocks are written (compressed, fsynced per policy) on a libuv worker thread one
 * at a time, and each finished write reports how far the journal is durable so that
 * connections can acknowledge. Segments are released once their events are committed in
 * PostgreSQL; at start the journal is replayed through the same ingest path.
 */
#ifndef TRACKD_JOURNALER_H
#define TRACKD_JOURNALER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "identity.h"
#include "journal.h"
#include "trackd_proto.h"

struct trackd_config;

/* Record types in the journal. */
enum { JREC_FRAME = 1 };

/* Who sent a journaled frame: what ingest needs to expand it again at replay. */
struct frame_origin {
    uint64_t session;
    bool context_tags;
    const char *user;
    const char *source_name;
    const char *source_type;
    const struct peer *peer; /* NULL in records written before peers were kept */
    uint8_t writers;         /* the writer count when journaled; 0: not recorded */
    uint8_t writer;          /* the writer that took the frame's events (ingest_route) */
};

struct journaler_cbs {
    /* Every record with an LSN <= lsn is written (and synced as the policy asks). */
    void (*durable)(void *ctx, uint64_t lsn);
    /* Writes fail (true: a full disk, an I/O error) or work again (false): while they fail,
     * clients must not be read. */
    void (*stalled)(void *ctx, bool stalled);
    /* Committed segments were deleted (journaler_release's work is done): the journal may
     * have room again. */
    void (*released)(void *ctx);
};

/* What the work item does with the journal; every kind also releases what is due. */
enum journaler_work { JW_WRITE, JW_SYNC, JW_RELEASE };

struct journaler {
    uv_loop_t *loop;
    const struct trackd_config *cfg;
    struct journal *j;
    struct journaler_cbs cbs;
    void *ctx;
    uv_work_t work_req;
    uv_timer_t sync_timer;  /* fsync = "interval": syncs written blocks nobody followed */
    uv_timer_t retry_timer; /* a failed write is tried again after a backoff */
    unsigned failures;      /* consecutive failed writes, for the backoff; 0 = writing works */
    struct journal_block *inflight;
    bool writing; /* a worker owns the journal (write, sync or release) */
    enum journaler_work work;
    struct journal *work_journal; /* j as the work item was queued (NULL during the replay) */
    uint64_t work_release;        /* the work item releases up to here; 0 = no release */
    int release_deleted;          /* segments it deleted, or -errno */
    int marker_rc;                /* writing committed.lsn: 0 or -errno */
    bool dirty;                   /* written since the last sync */
    int write_rc;
    struct journal_error err;
    uint64_t appended_lsn;
    uint64_t durable_lsn;
    uint64_t release_lsn; /* committed up to here; applied when no worker holds the journal */
    uint64_t released_lsn;
    bool closing;
    void (*closed)(struct journaler *);
};

/*
 * Replays the journal in dir before the agent serves anyone: cb receives each frame with
 * its origin and LSN, in LSN order, and pace runs after each one (it may run the loop until
 * memory allows more; non-zero stops the replay). Returns 0, 1 when pace stopped it, or
 * -errno with msg.
 */
typedef void (*journaler_frame_cb)(void *ctx, const struct frame_origin *o,
                                   const struct proto_header *h, const uint8_t *body, uint64_t lsn);
int journaler_replay(const struct trackd_config *cfg, journaler_frame_cb cb, int (*pace)(void *),
                     void *ctx, struct journal_replay_stats *st, char *msg, size_t msglen);

/* Sets jr up without opening the journal: releases may come in already (during replay). */
void journaler_init(struct journaler *jr, uv_loop_t *loop, const struct trackd_config *cfg,
                    const struct journaler_cbs *cbs, void *ctx);
/* Opens the journal for appending (after the replay). Returns 0 or -errno with msg. */
int journaler_open(struct journaler *jr, char *msg, size_t msglen);
/* Appends one frame (header + body); -ENOSPC when the journal is at its quota. */
int journaler_append(struct journaler *jr, const struct frame_origin *o,
                     const struct proto_header *h, const uint8_t *body, uint64_t *lsn);
/* Starts writing the open block unless a write is already running. */
void journaler_kick(struct journaler *jr);
/*
 * Everything up to lsn is committed in PostgreSQL: whole segments may go. Before
 * journaler_open only the committed position is recorded (replayed records are on disk).
 */
void journaler_release(struct journaler *jr, uint64_t lsn);
/* Bytes on disk and pending, against the quota. */
void journaler_usage(const struct journaler *jr, uint64_t *bytes, uint64_t *quota);
/* Waits for the running write, then closes; closed runs once all handles are closed. */
void journaler_close(struct journaler *jr, void (*closed)(struct journaler *));

#endif
