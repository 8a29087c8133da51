/*
 * Which writer connection (part) takes each run's events.
 *
 * A run without a route gets the part with the fewest routed runs (ties: the fewest pending
 * events, then the lowest index), so N runs fall evenly over the connections whatever their
 * ids. The route is kept while it is in use; routes_sweep drops it only when every event of the
 * run is finished on its part and the run sent nothing since the sweep before. A run's events
 * therefore never have two parts at once, which keeps its order, and a run that pauses for a
 * while may come back on another part.
 *
 * Routes depend on arrival and timing, so they are journaled with each record (agent/JOURNAL.md)
 * and a replay after a restart sends every record to the part it went to before: each part's
 * progress row then says exactly which of its events are committed.
 *
 * Nothing here needs a loop or a database. The table is open addressing over a power-of-two
 * number of slots, at most half full; it grows as runs arrive and is rebuilt at each sweep.
 */
#ifndef TRACKD_ROUTES_H
#define TRACKD_ROUTES_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "trackd_proto.h"

struct route {
    char run_id[PROTO_RUN_ID_LEN];
    uint64_t mark; /* every event of the run has a serial below this; 0 = a free slot */
    unsigned part;
};

struct routes {
    struct route *slots;
    size_t cap, used;
    unsigned nparts;
    size_t runs[CONFIG_MAX_WRITERS]; /* routes per part */
    uint64_t sweep_mark;             /* the next serial at the last sweep */
};

/* nparts: 1..CONFIG_MAX_WRITERS. Returns 0 or -ENOMEM. */
int routes_init(struct routes *r, unsigned nparts);
void routes_free(struct routes *r);
/*
 * The route of run_id (PROTO_RUN_ID_LEN bytes), made if the run has none: pending[p] is the
 * number of events part p holds unfinished (the tie-break). The caller sets ->mark once the
 * run's message is in. NULL when out of memory (the caller then uses part 0 unrecorded).
 */
struct route *routes_get(struct routes *r, const char *run_id, const size_t *pending);
/*
 * Makes part the route of run_id, as a journal record replayed after a restart says it was
 * (the run's events on its previous part, if any, were finished before it moved, so are
 * skipped at replay). NULL when out of memory.
 */
struct route *routes_set(struct routes *r, const char *run_id, unsigned part);
/*
 * Drops the routes no longer in use: those whose mark is at most first_pending[p] (the serial
 * of part p's first unfinished event, or the next serial when it has none) and at most the
 * next serial at the previous sweep (nothing sent since). next_serial is the serial the next
 * event will get. Returns the number of routes dropped.
 */
size_t routes_sweep(struct routes *r, const uint64_t *first_pending, uint64_t next_serial);
/* The most runs one part has now. */
size_t routes_busiest(const struct routes *r);

#endif
