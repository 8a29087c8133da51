/*
 * Session table: bounded memory whatever the clients do. Ids are random 64-bit values
 * chosen by the shims, so they are hashed as they are (mixed once to spread low bits).
 */
#include "session.h"

#include <errno.h>
#include <stdlib.h>

/* Entries live at most at 1/2 load so probes stay short. */
int session_table_init(struct session_table *t, size_t max_sessions)
{
    size_t cap = 16;
    while (cap < max_sessions * 2)
        cap *= 2;
    t->slots = calloc(cap, sizeof *t->slots);
    t->cap = cap;
    t->used = 0;
    return t->slots ? 0 : -ENOMEM;
}

void session_table_free(struct session_table *t)
{
    free(t->slots);
    t->slots = NULL;
    t->cap = t->used = 0;
}

static size_t home(const struct session_table *t, uint64_t id)
{
    id ^= id >> 33;
    id *= 0xff51afd7ed558ccdull;
    id ^= id >> 33;
    return (size_t)id & (t->cap - 1);
}

static struct session_entry *find(const struct session_table *t, uint64_t id)
{
    for (size_t i = home(t, id), n = 0; n < t->cap; i = (i + 1) & (t->cap - 1), n++) {
        if (t->slots[i].id == id)
            return &t->slots[i];
        if (t->slots[i].id == 0)
            return NULL;
    }
    return NULL;
}

uint64_t session_last_seq(const struct session_table *t, uint64_t id)
{
    const struct session_entry *e = id ? find(t, id) : NULL;
    return e ? e->last_seq : 0;
}

/* Rebuilds the table without its oldest entry (rare: only when it is full). */
static void evict_oldest(struct session_table *t)
{
    size_t oldest = 0;
    for (size_t i = 1; i < t->cap; i++)
        if (t->slots[i].id &&
            (!t->slots[oldest].id || t->slots[i].seen_ms < t->slots[oldest].seen_ms))
            oldest = i;
    struct session_entry *old = t->slots;
    t->slots = calloc(t->cap, sizeof *t->slots);
    if (t->slots == NULL) {
        t->slots = old; /* keep the table as it was rather than lose it */
        return;
    }
    t->used = 0;
    for (size_t i = 0; i < t->cap; i++) {
        if (old[i].id && i != oldest) {
            size_t j = home(t, old[i].id);
            while (t->slots[j].id)
                j = (j + 1) & (t->cap - 1);
            t->slots[j] = old[i];
            t->used++;
        }
    }
    free(old);
}

void session_note(struct session_table *t, uint64_t id, uint64_t seq, uint64_t now_ms)
{
    if (id == 0)
        return;
    struct session_entry *e = find(t, id);
    if (e == NULL) {
        if (t->used * 2 >= t->cap)
            evict_oldest(t);
        size_t i = home(t, id);
        while (t->slots[i].id)
            i = (i + 1) & (t->cap - 1);
        e = &t->slots[i];
        e->id = id;
        e->last_seq = 0;
        t->used++;
    }
    if (seq > e->last_seq)
        e->last_seq = seq;
    e->seen_ms = now_ms;
}
