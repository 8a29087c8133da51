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
    u->work.data = u;
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

/* Threadpool: getpwuid_r, with a buffer as large as the entry needs (up to 1 MiB). */
static void lookup_work(uv_work_t *req)
{
    struct users *u = req->data;
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
            rc = getpwuid_r(u->work_uid, &pw, buf, size, &res);
        while (rc == EINTR);
        size *= 2;
    }
    if (rc == 0 && res != NULL)
        snprintf(u->work_name, sizeof u->work_name, "%s", res->pw_name);
    else
        snprintf(u->work_name, sizeof u->work_name, "%u", (unsigned)u->work_uid);
    free(buf);
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
}

static void lookup_done(uv_work_t *req, int status);

/* Starts the lookup for the first waiter, answering from the cache where it can. */
static void next_lookup(struct users *u)
{
    while (!u->busy && !u->closed && u->head != NULL) {
        uid_t uid = u->head->uid;
        const struct users_entry *e = cached(u, uid);
        if (e != NULL) {
            answer(u, uid, e->name);
            continue;
        }
        u->work_uid = uid;
        u->work_name[0] = '\0';
        u->started_ns = uv_hrtime();
        if (uv_queue_work(u->loop, &u->work, lookup_work, lookup_done) != 0) {
            /* Only on a closing loop: name the uid by its number rather than leave it waiting. */
            char num[USERS_NAME_MAX];
            snprintf(num, sizeof num, "%u", (unsigned)uid);
            answer(u, uid, num);
            continue;
        }
        u->busy = true;
        stats.user_lookups++;
    }
}

static void lookup_done(uv_work_t *req, int status)
{
    struct users *u = req->data;
    u->busy = false;
    if (status != 0 || u->closed)
        return; /* cancelled at shutdown */
    uint64_t ms = (uv_hrtime() - u->started_ns) / 1000000u;
    if (ms >= USERS_SLOW_MS) {
        stats.user_lookups_slow++;
        log_limited(LOG_WARN,
                    "[conn] NSS took %" PRIu64
                    " ms to name uid %u (getpwuid_r, on the threadpool); "
                    "connections of that uid waited, others did not. Check the directory service "
                    "(nscd or sssd caching helps)",
                    ms, (unsigned)u->work_uid);
    }
    struct users_entry *e = slot_for(u, u->work_uid);
    e->uid = u->work_uid;
    e->at_ms = uv_now(u->loop) ? uv_now(u->loop) : 1;
    snprintf(e->name, sizeof e->name, "%s", u->work_name);
    answer(u, e->uid, u->work_name);
    next_lookup(u);
}

void users_resolve(struct users *u, struct users_wait *w)
{
    w->next = NULL;
    if (u->tail)
        u->tail->next = w;
    else
        u->head = w;
    u->tail = w;
    stats.user_lookup_waits++;
    next_lookup(u);
}

void users_cancel(struct users *u, struct users_wait *w)
{
    take(u, w, w->uid);
}

void users_close(struct users *u)
{
    u->closed = true;
    u->head = u->tail = NULL;
    if (u->busy)
        uv_cancel((uv_req_t *)&u->work); /* fails, harmlessly, once the lookup runs */
}
