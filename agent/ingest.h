/*
 * Ingest: turns decoded client messages into validated events in the open
 * batches, one per writer connection (a run's events go to one at a time, its route:
 * routes.h), cuts batches (by rows, bytes, age, or a flush) and hands them
 * to the writers, and answers flush barriers once everything accepted before them
 * is committed or rejected, on every writer. It also owns the pending-memory bound:
 * above it, clients are paused (their sockets are not read) until the writers catch up.
 */
#ifndef TRACKD_INGEST_H
#define TRACKD_INGEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "batch.h"
#include "config.h"
#include "events.h"
#include "routes.h"
#include "trackd_proto.h"

struct trackd_config;
struct writer;

struct ingest_cbs {
    /* Stop (true) or resume (false) reading every client socket. */
    void (*pause)(void *ctx, bool pause);
    /* Everything conn_id sent before flush_seq is committed or rejected. */
    void (*flushed)(void *ctx, uint32_t conn_id, uint64_t flush_seq);
    /* An event of frame seq from conn_id will not be written. */
    void (*error)(void *ctx, uint32_t conn_id, uint64_t seq, uint32_t code, const char *message);
    /* Every journal record up to lsn is committed or rejected. */
    void (*released)(void *ctx, uint64_t lsn);
};

/* An artifact still uploading: a flush of its client (conn_id; 0 none) covering serial waits. */
struct ingest_hold {
    uint32_t conn_id;
    uint64_t serial;
};

struct flush_waiter {
    uint32_t conn_id;
    uint64_t flush_seq;
    uint64_t serial; /* done when done_serial reaches it */
};

/* One writer connection's share of the events. */
struct ingest_part {
    struct writer *writer;
    struct batch *open; /* events not yet handed to the writer; owned */
    bool age_due;       /* the open batch is old enough; cut when the writer is free */
};

struct ingest {
    uv_loop_t *loop;
    const struct trackd_config *cfg;
    struct ingest_part parts[CONFIG_MAX_WRITERS];
    unsigned nparts;
    struct ingest_cbs cbs;
    void *ctx;

    uv_timer_t age_timer; /* the oldest open batch's age */
    uint64_t next_serial; /* serial of the next accepted event */
    uint64_t done_serial; /* every event with a serial <= this is finished */
    uint64_t last_lsn;    /* the latest journal record ingested */
    uint64_t released;    /* every record up to here is finished (cbs.released) */
    size_t queued_bytes;  /* batches with the writers */
    size_t queued_events; /* their events */
    bool paused;

    struct flush_waiter *waiters;
    size_t nwaiters;
    size_t capwaiters;

    struct routes routes; /* which writer takes each run's events */

    struct ingest_hold *holds; /* artifacts still uploading: their client's barriers wait */
    size_t nholds, capholds;
};

/* writers: nwriters (1..CONFIG_MAX_WRITERS) writers, not owned. Returns 0 or -ENOMEM. */
int ingest_init(struct ingest *in, uv_loop_t *loop, const struct trackd_config *cfg,
                struct writer *writers, unsigned nwriters, const struct ingest_cbs *cbs, void *ctx);
#define INGEST_ROUTE_NEW -1  /* route the run here: its route, or the least-loaded writer */
#define INGEST_ROUTE_HASH -2 /* a record of another writer count: a hash of the run id */
/*
 * Which writer takes msg's events (0..nwriters-1), before it is journaled (the record keeps
 * it): given >= 0 is the writer a replayed record names, made the run's route; otherwise
 * INGEST_ROUTE_NEW or INGEST_ROUTE_HASH. A message about no run goes to writer 0.
 */
unsigned ingest_route(struct ingest *in, const struct proto_msg *msg, int given);
/*
 * Validates msg and appends its events to writer p's open batch (p from ingest_route), via
 * events_from_message. Invalid parts are reported through cbs.error and counted; the rest is
 * kept. Returns 0, or -ENOMEM when the event could not be stored (also reported).
 */
int ingest_message(struct ingest *in, const struct events_origin *o, const struct proto_msg *msg,
                   unsigned p);
/*
 * Registers a barrier for everything accepted so far; cbs.flushed answers it (maybe at once).
 * Returns 0, or -ENOBUFS when the agent-wide bound on waiting barriers is reached (reported
 * through cbs.error).
 */
int ingest_flush(struct ingest *in, uint32_t conn_id, uint64_t flush_seq);
/*
 * A snapshotted artifact: its ledger row (trackd_artifacts) goes in with the open batch.
 * Strings are NUL-terminated. Returns the event's serial, or 0 if it could not be stored.
 */
uint64_t ingest_artifact(struct ingest *in, const struct events_origin *o, uint64_t seq,
                         const char *run_id, const char *path, const char *id, uint64_t size,
                         const char *sha256);
/* The upload of artifact id ended: status "done" or "failed" (error says why). */
int ingest_artifact_done(struct ingest *in, const char *id, const char *status, const char *error);
/* Flush barriers of conn_id covering serial wait until ingest_unhold(serial): an upload in
 * progress. Another client's barrier does not wait for it (a flush covers what its own client
 * logged), unless its client is gone (conn_id 0: recovered from the spool after a restart, or
 * its connection closed), since that client may reconnect and flush again. Holding a held
 * serial again gives it to conn_id. */
int ingest_hold(struct ingest *in, uint32_t conn_id, uint64_t serial);
void ingest_unhold(struct ingest *in, uint64_t serial);
/* Once a second: routes no longer in use are dropped (routes_sweep). */
void ingest_tick(struct ingest *in);
/* Hands every open batch to its writer now. */
void ingest_cut(struct ingest *in);
/* Writer callback: b is finished; frees it, answers satisfied barriers and releases the
 * journal records every writer is through with. */
void ingest_batch_done(struct ingest *in, struct batch *b);
size_t ingest_pending_bytes(const struct ingest *in);
bool ingest_drained(const struct ingest *in);
/* Drops barriers of a closed connection; its uploads then hold every barrier (ingest_hold). */
void ingest_forget_conn(struct ingest *in, uint32_t conn_id);
void ingest_close(struct ingest *in);

#endif
