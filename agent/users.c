/*
 * User names of peer uids, looked up off the loop (users.h).
 */
#include "users.h"

#include <errno.h>
#include <inttypes.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "stats.h"

/* A lookup slower than this is logged: the operator should look at NSS. */
#define USERS_SLOW_MS 1000u

int users_init(struct users *u, uv_loop_t *loop)
{
    memset(u, 0, sizeof *u);
    u->loop = loop;
    u->cache = calloc(USERS_CACHE_MAX, sizeof *u->cache);
    if (u->cache == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < USERS_LOOKUPS_MAX; i++) {
        u->jobs[i].u = u;
        u->jobs[i].work.data = &u->jobs[i];
    }
    uv_timer_init(loop, &u->deadline);
    u->deadline.data = u;
    return 0;
}

void users_free(struct users *u)
{
    free(u->cache);
    u->cache = NULL;
}

static struct users_entry *cached(struct users *u, uid_t uid)
{
    uint64_t now = uv_now(u->loop);
    for (size_t i = 0; i < USERS_CACHE_MAX; i++) {
        struct users_entry *e = &u->cache[i];
        if (e->at_ms != 0 && e->uid == uid)
            return now - e->at_ms < USERS_TTL_MS ? e : NULL;
    }
    return NULL;
}

const char *users_find(struct users *u, uid_t uid)
{
    struct users_entry *e = cached(u, uid);
    return e ? e->name : NULL;
}

/* The slot for uid's answer: its old one, else a free one, else the oldest answer's. */
static struct users_entry *slot_for(struct users *u, uid_t uid)
{
    struct users_entry *pick = &u->cache[0];
    for (size_t i = 0; i < USERS_CACHE_MAX; i++) {
        struct users_entry *e = &u->cache[i];
        if (e->at_ms != 0 && e->uid == uid)
            return e;
        if (pick->at_ms != 0 && (e->at_ms == 0 || e->at_ms < pick->at_ms))
            pick = e;
    }
    return pick;
}

/* getpwuid_r with a buffer as large as the entry needs (up to 1 MiB); the uid's number when
 * there is no entry. Any thread. */
static void name_of(uid_t uid, char *out, size_t n)
{
    size_t size = 1024;
    char *buf = NULL;
    struct passwd pw, *res = NULL;
    int rc = ERANGE;
    while (rc == ERANGE && size <= (1u << 20)) {
        char *nb = realloc(buf, size);
        if (nb == NULL)
            break;
        buf = nb;
        do
            rc = getpwuid_r(uid, &pw, buf, size, &res);
        while (rc == EINTR);
        size *= 2;
    }
    if (rc == 0 && res != NULL)
        snprintf(out, n, "%s", res->pw_name);
    else
        snprintf(out, n, "%u", (unsigned)uid);
    free(buf);
}

static void remember(struct users *u, uid_t uid, const char *name)
{
    struct users_entry *e = slot_for(u, uid);
    e->uid = uid;
    e->at_ms = uv_now(u->loop) ? uv_now(u->loop) : 1;
    snprintf(e->name, sizeof e->name, "%s", name);
}

void users_prime(struct users *u, uid_t uid)
{
    char name[USERS_NAME_MAX];
    name_of(uid, name, sizeof name);
    remember(u, uid, name);
}

/* Threadpool. */
static void lookup_work(uv_work_t *req)
{
    struct users_job *j = req->data;
    name_of(j->uid, j->name, sizeof j->name);
}

/* Takes the first waiter that is w (or, w NULL, the first for uid) off the queue. */
static struct users_wait *take(struct users *u, const struct users_wait *w, uid_t uid)
{
    struct users_wait *prev = NULL;
    for (struct users_wait *x = u->head; x; prev = x, x = x->next) {
        if (w ? x != w : x->uid != uid)
            continue;
        if (prev)
            prev->next = x->next;
        else
            u->head = x->next;
        if (u->tail == x)
            u->tail = prev;
        x->next = NULL;
        return x;
    }
    return NULL;
}

/* Answers every waiter for uid, one at a time: a callback may queue or cancel waiters. */
static void answer(struct users *u, uid_t uid, const char *name)
{
    char copy[USERS_NAME_MAX];
    snprintf(copy, sizeof copy, "%s", name);
    struct users_wait *w;
    while ((w = take(u, NULL, uid)) != NULL)
        w->cb(w, copy);
    if (u->head == NULL && !u->closed)
        uv_timer_stop(&u->deadline); /* nobody waits: the loop may rest */
}

static void lookup_done(uv_work_t *req, int status);

/* Starts a lookup for every waiting uid that is neither cached nor being looked up, while a
 * job is free; answers from the cache where it can. */
static void next_lookup(struct users *u)
{
    for (struct users_wait *w = u->head; w != NULL && !u->closed;) {
        uid_t uid = w->uid;
        const struct users_entry *e = cached(u, uid);
        if (e != NULL) {
            answer(u, uid, e->name); /* callbacks may change the list: start over */
            w = u->head;
            continue;
        }
        struct users_job *free_job = NULL;
        bool running = false;
        for (size_t i = 0; i < USERS_LOOKUPS_MAX; i++) {
            running |= u->jobs[i].busy && u->jobs[i].uid == uid;
            if (!u->jobs[i].busy && free_job == NULL)
                free_job = &u->jobs[i];
        }
        if (!running && free_job == NULL)
            return;
        if (!running) {
            free_job->uid = uid;
            free_job->name[0] = '\0';
            free_job->started_ns = uv_hrtime();
            if (uv_queue_work(u->loop, &free_job->work, lookup_work, lookup_done) != 0) {
                /* Only on a closing loop: the number, rather than leave it waiting. */
                char num[USERS_NAME_MAX];
                snprintf(num, sizeof num, "%u", (unsigned)uid);
                answer(u, uid, num);
                w = u->head;
                continue;
            }
            free_job->busy = true;
            stats.user_lookups++;
        }
        w = w->next;
    }
}

static void lookup_done(uv_work_t *req, int status)
{
    struct users_job *j = req->data;
    struct users *u = j->u;
    j->busy = false;
    if (status != 0 || u->closed)
        return; /* cancelled at shutdown */
    uint64_t ms = (uv_hrtime() - j->started_ns) / 1000000u;
    if (ms >= USERS_SLOW_MS) {
        stats.user_lookups_slow++;
        log_limited(LOG_WARN,
                    "[conn] NSS took %" PRIu64 " ms to name uid %u (getpwuid_r, on a worker "
                    "thread); only connections of uids not yet known waited. Check the directory "
                    "service (nscd or sssd caching helps)",
                    ms, (unsigned)j->uid);
    }
    remember(u, j->uid, j->name);
    answer(u, j->uid, j->name);
    next_lookup(u);
}

/* Waiters past USERS_WAIT_MS get their uid's number; their lookup goes on. */
static void deadline_cb(uv_timer_t *t)
{
    struct users *u = t->data;
    uint64_t now = uv_now(u->loop);
    for (struct users_wait *w = u->head; w != NULL;) {
        if (now - w->since_ms < USERS_WAIT_MS) {
            w = w->next;
            continue;
        }
        struct users_wait *late = take(u, w, w->uid);
        char num[USERS_NAME_MAX];
        snprintf(num, sizeof num, "%u", (unsigned)late->uid);
        stats.user_lookup_timeouts++;
        log_limited(LOG_WARN,
                    "[conn] no user name for uid %u after %u ms (NSS does not answer): its "
                    "connection goes on with the number as its user name",
                    (unsigned)late->uid, USERS_WAIT_MS);
        late->cb(late, num);
        w = u->head; /* the callback may have changed the list */
    }
    if (u->head == NULL)
        uv_timer_stop(&u->deadline);
}

void users_resolve(struct users *u, struct users_wait *w)
{
    w->next = NULL;
    w->since_ms = uv_now(u->loop);
    if (u->tail)
        u->tail->next = w;
    else
        u->head = w;
    u->tail = w;
    stats.user_lookup_waits++;
    next_lookup(u);
    if (u->head != NULL && !u->closed && !uv_is_active((uv_handle_t *)&u->deadline))
        uv_timer_start(&u->deadline, deadline_cb, 1000, 1000);
}

void users_cancel(struct users *u, struct users_wait *w)
{
    take(u, w, w->uid);
    if (u->head == NULL && !u->closed)
        uv_timer_stop(&u->deadline);
}

void users_close(struct users *u)
{
    u->closed = true;
    u->head = u->tail = NULL;
    for (size_t i = 0; i < USERS_LOOKUPS_MAX; i++)
        if (u->jobs[i].busy)
            uv_cancel((uv_req_t *)&u->jobs[i].work); /* fails, harmlessly, once it runs */
    if (!uv_is_closing((uv_handle_t *)&u->deadline))
        uv_close((uv_handle_t *)&u->deadline, NULL);
}
