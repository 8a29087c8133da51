/*
 * Client sessions across reconnects. A shim names itself with a random session id in its
 * hello and numbers its frames; after a reconnect it resends what the agent had not
 * acknowledged. The table remembers, per session, the highest frame seq accepted, so that a
 * resent frame the agent already has is acknowledged again but not ingested twice.
 */
#ifndef TRACKD_SESSION_H
#define TRACKD_SESSION_H

#include <stddef.h>
#include <stdint.h>

struct session_entry {
    uint64_t id;       /* 0 = empty slot */
    uint64_t last_seq; /* highest frame seq accepted */
    uint64_t seen_ms;  /* last update, for eviction */
};

/* A fixed-size open-addressing table; the least recently seen entry gives way when full. */
struct session_table {
    struct session_entry *slots;
    size_t cap; /* power of two */
    size_t used;
};

int session_table_init(struct session_table *t, size_t max_sessions);
void session_table_free(struct session_table *t);
/* Highest accepted seq of session id, 0 if unknown. */
uint64_t session_last_seq(const struct session_table *t, uint64_t id);
/* Records that session id accepted every frame up to seq (keeps the maximum). */
void session_note(struct session_table *t, uint64_t id, uint64_t seq, uint64_t now_ms);

#endif
