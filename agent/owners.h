/*
 * Runs belong to whoever started them. The uid a run was started by (and the [agent]
 * shared_gids it was a member of) is recorded in trackd_run_owners in the transaction that
 * creates the run; afterwards a client may write to the run only if
 *
 *   - its uid is the owner's, or
 *   - it shares with the owner a group that is in [agent] shared_gids (both memberships as the
 *     socket reported them when each connected: the DDP case across users).
 *
 * A run with no row (started by MLflow itself, or by trackd before runs were owned) belongs
 * to the local user whose name is the run's user_id: MLflow records getpass.getuser() there
 * (or, with [agent] open_unowned_runs, to everyone).
 *
 * Events without a peer (the agent's own ledger updates, records journaled before peers were
 * kept) are not checked. Experiments are not owned: anyone may create one, as in MLflow.
 *
 * The writer checks each range before building its statements: owners_plan() finds the runs
 * it must ask PostgreSQL about (an owner never changes once recorded, so what it learned is
 * kept in a bounded cache), owners_learn() takes each answer, and owners_check() decides every
 * event. Nothing here needs a database or a loop.
 */
#ifndef TRACKD_OWNERS_H
#define TRACKD_OWNERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "batch.h"
#include "identity.h"
#include "trackd_proto.h"

#define OWNERS_CACHE_MAX 4096 /* runs remembered; the cache starts over when it is full */
#define OWNERS_USER_MAX 63    /* a user_id longer than this matches no local user name */

enum owner_kind {
    OWNER_NONE,     /* a free cache slot */
    OWNER_RECORDED, /* a trackd_run_owners row: id.uid and id.shared */
    OWNER_USER_ID,  /* no row: the local user named user_id */
    OWNER_STARTING  /* no run yet: the range starts it, as id (never cached) */
};

struct run_owner {
    uint8_t kind;
    char run_id[PROTO_RUN_ID_LEN];
    struct peer id;
    char user_id[OWNERS_USER_MAX + 1]; /* OWNER_USER_ID; "" when too long to match anyone */
};

/* The owners of one range's runs, sorted by run id once planned. */
struct owner_set {
    struct run_owner *v;
    size_t n, cap;
};

struct owners {
    struct run_owner *slots; /* open addressing over 2 * OWNERS_CACHE_MAX slots */
    size_t used;
    struct owner_set set; /* the range being checked */
    bool open_unowned;    /* [agent] open_unowned_runs */
};

/* open_unowned: runs without a row may be written by anyone ([agent] open_unowned_runs). */
int owners_init(struct owners *o, bool open_unowned);
void owners_free(struct owners *o);
/* Forgets everything learned (a new connection may be to another server). */
void owners_clear(struct owners *o);

/*
 * Starts checking events [lo, hi) of b: the owners of their runs that the cache knows go into
 * o->set, and the ids of the others are appended to ids (a text array literal, finished) for
 * the caller to look up with dbobjects_run_owners_sql. Returns how many ids it needs, or
 * -ENOMEM.
 */
int owners_plan(struct owners *o, const struct batch *b, size_t lo, size_t hi,
                struct proto_buf *ids);
/*
 * One row of that lookup: the run exists; uid < 0 when it has no trackd_run_owners row (the
 * user_id rule applies). gids is the row's shared_gids as PostgreSQL prints an int8[]
 * ("{1,2}"). keep: remember it beyond this range (false when the answer may change, i.e.
 * without the table). Returns 0, or -EINVAL for a malformed row: nobody may write that run
 * then (it is taken as owned by uid 4294967295), and nothing is kept.
 */
int owners_learn(struct owners *o, const char *run_id, int64_t uid, const char *gids,
                 const char *user_id, bool keep);
/*
 * Decides every event of [lo, hi) that carries a peer and is not rejected yet: a run that does
 * not exist yet belongs to the peer of its first start in the range (a start without a peer,
 * replayed from an older journal, makes it the user_id rule's); events of runs that do not
 * exist and are not started here are left to the run-state check. refused(ctx, i, msg) is
 * called for every event the peer may not write. Returns how many were refused.
 */
typedef void (*owners_refused_cb)(void *ctx, size_t i, const char *msg);
size_t owners_check(struct owners *o, const struct batch *b, size_t lo, size_t hi,
                    owners_refused_cb refused, void *ctx);

/*
 * The rule itself: may the client id, whose user name (from its uid, through NSS) is
 * user[0..user_len), write to the run owner describes? If not, msg says why, naming the key
 * that would change it. open_unowned as in owners_init.
 */
bool owners_may_write(const struct run_owner *owner, const struct peer *id, const char *user,
                      size_t user_len, bool open_unowned, char *msg, size_t msglen);

#endif
