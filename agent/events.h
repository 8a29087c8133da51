/*
 * MLflow's rules for one client message: validation (validate.h, as MLflow's
 * mlflow/utils/validation.py) and expansion into batch events (batch.h), with nothing else: no
 * loop, no writer, no I/O. Errors go to the sink's callback and the rejected_* counters.
 */
#ifndef TRACKD_EVENTS_H
#define TRACKD_EVENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "batch.h"
#include "identity.h"
#include "trackd_proto.h"

struct trackd_config;

/* Who sent a message; strings are borrowed for the call. */
struct events_origin {
    uint32_t conn_id;
    const char *user;        /* from the peer's uid */
    const char *source_name; /* from the client's hello */
    const char *source_type;
    bool context_tags;       /* add mlflow.user / mlflow.source.* when the run lacks them */
    uint64_t lsn;            /* journal record the message came from; 0 when not journaled */
    const struct peer *peer; /* who sent it, for the run-owner rule; NULL: the agent itself,
                                or a record journaled before peers were kept (not checked) */
};

/* Where a message's events and errors go. */
struct events_sink {
    const struct trackd_config *cfg; /* trust_client_user, artifact destinations */
    struct batch *b;                 /* events are appended here */
    uint16_t peer;                   /* ev.peer of every event: 1 + index in b's peers, or 0 */
    uint64_t *next_serial;           /* agent-wide arrival order, taken one per event */
    /* An event of frame seq from conn_id will not be written; message names the rule. */
    void (*error)(void *ctx, uint32_t conn_id, uint64_t seq, uint32_t code, const char *message);
    void *ctx;
};

/*
 * Validates msg and appends its events to s->b. Invalid parts are reported through s->error
 * and counted (rejected_*); the rest is kept. Returns 0, or -ENOMEM when an event could not be
 * stored (also reported, as PROTO_ERR_SHUTDOWN).
 */
int events_from_message(const struct events_sink *s, const struct events_origin *o,
                        const struct proto_msg *msg);

/* Reports a refusal the caller decided (code: PROTO_ERR_*), counted like the rules' own. */
void events_reject(const struct events_sink *s, const struct events_origin *o, uint64_t seq,
                   uint32_t code, const char *message);

/* A snapshotted artifact's ledger row (trackd_artifacts). Strings are NUL-terminated. Returns
 * the event's serial, or 0 when it could not be stored. */
uint64_t events_artifact(const struct events_sink *s, const struct events_origin *o, uint64_t seq,
                         const char *run_id, const char *path, const char *id, uint64_t size,
                         const char *sha256);

/* The upload of artifact id ended: status "done" or "failed" (error says why). 0 or -ENOMEM. */
int events_artifact_done(const struct events_sink *s, const char *id, const char *status,
                         const char *error);

/* Fills out (>= 24 bytes) with an adjective-noun-number name like MLflow's, for a run started
 * without one. */
void events_random_run_name(char *out, size_t len);

#endif
