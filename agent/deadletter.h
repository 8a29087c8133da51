/*
 * The dead-letter file: one JSON line per event the agent will never write, with the
 * reason, so that nothing rejected disappears silently. It lives next to the journal as
 * dead-letter.jsonl; lines are appended whole with O_APPEND and never rewritten.
 */
#ifndef TRACKD_DEADLETTER_H
#define TRACKD_DEADLETTER_H

#include <stdint.h>

#include "batch.h"

struct deadletter {
    int fd; /* -1 when the file could not be opened (counted, logged once) */
    char path[4200];
};

int deadletter_open(struct deadletter *d, const char *journal_dir);
void deadletter_close(struct deadletter *d);
/* An event PostgreSQL or the writer refused; sqlstate may be "". */
void deadletter_event(struct deadletter *d, const struct batch *b, const struct ev *ev,
                      uint32_t code, const char *sqlstate, const char *message);
/* A message ingest refused before it became an event. */
void deadletter_frame(struct deadletter *d, uint32_t conn_id, uint64_t seq, uint32_t code,
                      const char *message);

#endif
