/*
 * Run routes over the writer connections: see routes.h.
 */
#include "routes.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define ROUTES_MIN_CAP 64

int routes_init(struct routes *r, unsigned nparts)
{
    memset(r, 0, sizeof *r);
    r->nparts = nparts ? nparts : 1;
    r->slots = calloc(ROUTES_MIN_CAP, sizeof *r->slots);
    if (r->slots == NULL)
        return -ENOMEM;
    r->cap = ROUTES_MIN_CAP;
    return 0;
}

void routes_free(struct routes *r)
{
    free(r->slots);
    r->slots = NULL;
    r->cap = r->used = 0;
}

static size_t slot_of(const char *run_id, size_t cap)
{
    uint64_t h = UINT64_C(14695981039346656037); /* FNV-1a */
    for (size_t i = 0; i < PROTO_RUN_ID_LEN; i++)
        h = (h ^ (uint8_t)run_id[i]) * UINT64_C(1099511628211);
    return (size_t)h & (cap - 1);
}

/* The slot holding run_id, or the free slot where it would go. */
static struct route *probe(struct route *slots, size_t cap, const char *run_id)
{
    for (size_t i = slot_of(run_id, cap);; i = (i + 1) & (cap - 1))
        if (slots[i].mark == 0 || memcmp(slots[i].run_id, run_id, PROTO_RUN_ID_LEN) == 0)
            return &slots[i];
}

/* Moves the routes keep() accepts into a new table of cap slots. -ENOMEM leaves r as it was. */
static int rebuild(struct routes *r, size_t cap, const uint64_t *first_pending, uint64_t limit)
{
    struct route *slots = calloc(cap, sizeof *slots);
    if (slots == NULL)
        return -ENOMEM;
    size_t used = 0;
    for (size_t i = 0; i < r->cap; i++) {
        const struct route *e = &r->slots[i];
        if (e->mark == 0)
            continue;
        if (first_pending && e->mark <= first_pending[e->part] && e->mark <= limit) {
            r->runs[e->part]--;
            continue;
        }
        *probe(slots, cap, e->run_id) = *e;
        used++;
    }
    free(r->slots);
    r->slots = slots;
    r->cap = cap;
    r->used = used;
    return 0;
}

/* The part a new run goes to: the fewest runs, then the fewest pending events. */
static unsigned least_loaded(const struct routes *r, const size_t *pending)
{
    unsigned best = 0;
    for (unsigned p = 1; p < r->nparts; p++)
        if (r->runs[p] < r->runs[best] ||
            (r->runs[p] == r->runs[best] && pending && pending[p] < pending[best]))
            best = p;
    return best;
}

struct route *routes_get(struct routes *r, const char *run_id, const size_t *pending)
{
    struct route *e = probe(r->slots, r->cap, run_id);
    if (e->mark != 0)
        return e;
    /* At most half full, so a probe always ends; past that, grow first. */
    if (2 * (r->used + 1) > r->cap) {
        if (rebuild(r, 2 * r->cap, NULL, 0) != 0)
            return NULL;
        e = probe(r->slots, r->cap, run_id);
    }
    memcpy(e->run_id, run_id, PROTO_RUN_ID_LEN);
    e->part = least_loaded(r, pending);
    e->mark = 1; /* in use; the caller sets the real mark */
    r->runs[e->part]++;
    r->used++;
    return e;
}

struct route *routes_set(struct routes *r, const char *run_id, unsigned part)
{
    struct route *e = routes_get(r, run_id, NULL);
    if (e == NULL || part >= r->nparts || e->part == part)
        return e;
    r->runs[e->part]--;
    r->runs[part]++;
    e->part = part;
    return e;
}

size_t routes_sweep(struct routes *r, const uint64_t *first_pending, uint64_t next_serial)
{
    size_t before = r->used, live = 0;
    uint64_t limit = r->sweep_mark;
    for (size_t i = 0; i < r->cap; i++) {
        const struct route *e = &r->slots[i];
        if (e->mark && !(e->mark <= first_pending[e->part] && e->mark <= limit))
            live++;
    }
    size_t cap = ROUTES_MIN_CAP;
    while (cap < 2 * (live + 1))
        cap *= 2;
    if (rebuild(r, cap, first_pending, limit) != 0)
        return 0; /* kept as they are; the next sweep tries again */
    r->sweep_mark = next_serial;
    return before - r->used;
}

size_t routes_busiest(const struct routes *r)
{
    size_t most = 0;
    for (unsigned p = 0; p < r->nparts; p++)
        if (r->runs[p] > most)
            most = r->runs[p];
    return most;
}
