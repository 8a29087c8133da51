/*
 * User names of peer uids, for a run's user_id and its mlflow.user tag. getpwuid_r goes through
 * NSS, which may block for seconds (LDAP, SSSD, a slow NIS server), so it never runs on the
 * loop: each lookup is a uv_queue_work item, at most USERS_LOOKUPS_MAX at once (for different
 * uids: callers of one uid share one lookup), and answers are cached for USERS_TTL_MS in a table
 * of USERS_CACHE_MAX uids. A connection whose uid is not cached waits in CONN_RESOLVING, unread,
 * while other clients go on; after USERS_WAIT_MS it is answered with the uid's number (not
 * cached: the lookup goes on, and its answer serves the next connections). A uid without a
 * passwd entry is named by its number too.
 *
 * Loop thread only, but for the work callback, which touches nothing but its job.
 */
#ifndef TRACKD_USERS_H
#define TRACKD_USERS_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#define USERS_CACHE_MAX 1024
#define USERS_TTL_MS (10u * 60u * 1000u)
#define USERS_LOOKUPS_MAX 4
#define USERS_WAIT_MS 10000u
#define USERS_NAME_MAX 64 /* bytes with the NUL; longer names are cut */

struct users_wait;
/* name is NUL-terminated and valid during the call only. */
typedef void (*users_cb)(struct users_wait *w, const char *name);

/* A caller waiting for uid's name; owned by the caller, linked while it waits. */
struct users_wait {
    uid_t uid;
    users_cb cb;
    uint64_t since_ms;       /* private: loop time it started waiting */
    struct users_wait *next; /* private */
};

struct users_entry {
    uid_t uid;
    uint64_t at_ms; /* loop time of the answer; 0 = free slot */
    char name[USERS_NAME_MAX];
};

/* One getpwuid_r on the threadpool. */
struct users_job {
    uv_work_t work;
    struct users *u;
    bool busy;
    uid_t uid;                 /* written by the loop before queueing */
    uint64_t started_ns;       /* uv_hrtime() when queued */
    char name[USERS_NAME_MAX]; /* written by the work, read after it */
};

struct users {
    uv_loop_t *loop;
    struct users_entry *cache; /* USERS_CACHE_MAX slots */
    struct users_wait *head, *tail;
    struct users_job jobs[USERS_LOOKUPS_MAX];
    uv_timer_t deadline; /* answers waiters older than USERS_WAIT_MS */
    bool closed;
};

/* Returns 0 or -ENOMEM. */
int users_init(struct users *u, uv_loop_t *loop);

/* Looks uid up now, blocking, and caches the answer: for the agent's own uid at start-up,
 * before the loop serves anyone, so that `trackd stats` never waits for NSS. */
void users_prime(struct users *u, uid_t uid);

/* uid's name if an answer younger than USERS_TTL_MS is cached, else NULL; valid until the next
 * call into u. */
const char *users_find(struct users *u, uid_t uid);

/*
 * Queues w (w->uid and w->cb set by the caller); w->cb is called on the loop once the name is
 * known, or with the uid's number after USERS_WAIT_MS. For a uid users_find holds, the callback
 * comes from inside this call; for any other, never.
 */
void users_resolve(struct users *u, struct users_wait *w);

/* Takes w off the queue if it is still waiting (its connection closed); no callback follows. */
void users_cancel(struct users *u, struct users_wait *w);

/* Shutdown: drops the waiters without callbacks, closes the timer and cancels lookups that have
 * not started; one that is running finishes (the loop waits for it). */
void users_close(struct users *u);

/* After the loop has ended. */
void users_free(struct users *u);

#endif
