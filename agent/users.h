/*
 * User names of peer uids, for a run's user_id and its mlflow.user tag. getpwuid_r goes through
 * NSS, which may block for seconds (LDAP, SSSD, a slow NIS server), so it never runs on the
 * loop: a lookup is a uv_queue_work item, one at a time (a stuck directory holds one threadpool
 * thread, never the ones the journal and the uploads need), and answers are cached for
 * USERS_TTL_MS in a table of USERS_CACHE_MAX uids. A connection whose uid is not cached waits
 * in CONN_RESOLVING, unread, while other clients go on. A uid without a passwd entry is named
 * by its number.
 *
 * Loop thread only, but for the work callback, which touches nothing but the work item.
 */
#ifndef TRACKD_USERS_H
#define TRACKD_USERS_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#define USERS_CACHE_MAX 1024
#define USERS_TTL_MS (10u * 60u * 1000u)
#define USERS_NAME_MAX 64 /* bytes with the NUL; longer names are cut */

struct users_wait;
/* name is NUL-terminated and valid during the call only. */
typedef void (*users_cb)(struct users_wait *w, const char *name);

/* A caller waiting for uid's name; owned by the caller, linked while it waits. */
struct users_wait {
    uid_t uid;
    users_cb cb;
    struct users_wait *next; /* private */
};

struct users_entry {
    uid_t uid;
    uint64_t at_ms; /* loop time of the answer; 0 = free slot */
    char name[USERS_NAME_MAX];
};

struct users {
    uv_loop_t *loop;
    struct users_entry *cache; /* USERS_CACHE_MAX slots */
    struct users_wait *head, *tail;
    uv_work_t work;
    bool busy; /* a lookup is queued or running */
    bool closed;
    uint64_t started_ns;            /* uv_hrtime() when the lookup was queued */
    uid_t work_uid;                 /* written by the loop before queueing */
    char work_name[USERS_NAME_MAX]; /* written by the work, read after it */
};

/* Returns 0 or -ENOMEM. */
int users_init(struct users *u, uv_loop_t *loop);

/* uid's name if an answer younger than USERS_TTL_MS is cached, else NULL; valid until the next
 * call into u. Counts a hit or a miss. */
const char *users_find(struct users *u, uid_t uid);

/*
 * Queues w (w->uid and w->cb set by the caller); w->cb is called on the loop once the name is
 * known. Callers of the same uid share one lookup. For a uid users_find holds, the callback
 * comes from inside this call; for any other, never.
 */
void users_resolve(struct users *u, struct users_wait *w);

/* Takes w off the queue if it is still waiting (its connection closed); no callback follows. */
void users_cancel(struct users *u, struct users_wait *w);

/* Shutdown: drops the waiters without callbacks and cancels a lookup that has not started; one
 * that is running finishes (the loop waits for it). */
void users_close(struct users *u);

/* After the loop has ended. */
void users_free(struct users *u);

#endif
