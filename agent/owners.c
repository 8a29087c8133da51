/*
 * The run-owner rule and what the writer remembers of it. The cache is an open-addressing
 * table of run ids (FNV-1a) that is emptied when it fills: an owner never changes, so a
 * forgotten one only costs one more lookup. The set of one range is a sorted array.
 */
#include "owners.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

#define SLOTS (2 * OWNERS_CACHE_MAX)

int owners_init(struct owners *o, bool open_unowned)
{
    memset(o, 0, sizeof *o);
    o->open_unowned = open_unowned;
    o->slots = calloc(SLOTS, sizeof *o->slots);
    return o->slots ? 0 : -ENOMEM;
}

void owners_free(struct owners *o)
{
    free(o->slots);
    free(o->set.v);
    memset(o, 0, sizeof *o);
}

void owners_clear(struct owners *o)
{
    memset(o->slots, 0, SLOTS * sizeof *o->slots);
    o->used = 0;
}

static size_t slot_of(const char *run_id)
{
    uint64_t h = 0xcbf29ce484222325u;
    for (int i = 0; i < PROTO_RUN_ID_LEN; i++)
        h = (h ^ (uint8_t)run_id[i]) * 0x100000001b3u;
    return (size_t)(h % SLOTS);
}

static struct run_owner *cache_find(const struct owners *o, const char *run_id)
{
    for (size_t i = slot_of(run_id);; i = (i + 1) % SLOTS) {
        struct run_owner *e = &o->slots[i];
        if (e->kind == OWNER_NONE)
            return NULL;
        if (memcmp(e->run_id, run_id, PROTO_RUN_ID_LEN) == 0)
            return e;
    }
}

static void cache_put(struct owners *o, const struct run_owner *e)
{
    if (cache_find(o, e->run_id))
        return;
    if (o->used >= OWNERS_CACHE_MAX)
        owners_clear(o);
    size_t i = slot_of(e->run_id);
    while (o->slots[i].kind != OWNER_NONE)
        i = (i + 1) % SLOTS;
    o->slots[i] = *e;
    o->used++;
}

/* ---- the set of one range ------------------------------------------------------ */

static int cmp_owner(const void *a, const void *b)
{
    return memcmp(((const struct run_owner *)a)->run_id, ((const struct run_owner *)b)->run_id,
                  PROTO_RUN_ID_LEN);
}

static struct run_owner *set_find(const struct owner_set *s, const char *run_id)
{
    struct run_owner key;
    memcpy(key.run_id, run_id, PROTO_RUN_ID_LEN);
    return s->n ? bsearch(&key, s->v, s->n, sizeof *s->v, cmp_owner) : NULL;
}

static int set_add(struct owner_set *s, const struct run_owner *e)
{
    struct run_owner *v = util_grow(s->v, &s->cap, s->n, sizeof *v, 16);
    if (v == NULL)
        return -ENOMEM;
    s->v = v;
    s->v[s->n++] = *e;
    return 0;
}

/* Events the rule applies to: a client's, about a run. */
static bool checked(const struct batch *b, const struct ev *ev)
{
    return ev_frame(b, ev)->peer != 0 && !(ev->flags & EV_REJECTED) && ev->kind != EV_EXPERIMENT &&
           ev->kind != EV_ARTIFACT_DONE;
}

int owners_plan(struct owners *o, const struct batch *b, size_t lo, size_t hi,
                struct proto_buf *ids)
{
    struct owner_set *s = &o->set;
    s->n = 0;
    /* Every run once: consecutive events are mostly one run's, the sort finds the rest. */
    for (size_t i = lo; i < hi; i++) {
        const struct ev *ev = &b->evs[i];
        if (!checked(b, ev) ||
            (s->n && memcmp(s->v[s->n - 1].run_id, ev_run(b, ev), PROTO_RUN_ID_LEN) == 0))
            continue;
        struct run_owner e = {.kind = OWNER_NONE};
        memcpy(e.run_id, ev_run(b, ev), PROTO_RUN_ID_LEN);
        if (set_add(s, &e) != 0)
            return -ENOMEM;
    }
    if (s->n > 1)
        qsort(s->v, s->n, sizeof *s->v, cmp_owner);
    size_t n = 0;
    for (size_t k = 0; k < s->n; k++)
        if (n == 0 || cmp_owner(&s->v[n - 1], &s->v[k]) != 0)
            s->v[n++] = s->v[k];
    s->n = n;
    int missing = 0;
    for (size_t k = 0; k < s->n; k++) {
        const struct run_owner *hit = cache_find(o, s->v[k].run_id);
        if (hit) {
            s->v[k] = *hit;
            continue;
        }
        if (batch_array_append(ids, s->v[k].run_id, PROTO_RUN_ID_LEN) != 0)
            return -ENOMEM;
        missing++;
    }
    if (batch_array_finish(ids) != 0)
        return -ENOMEM;
    return missing;
}

/* "{1,2}" (or "{}") into id->shared; false if malformed. */
static bool parse_gids(const char *text, struct peer *id)
{
    const char *p = text;
    if (*p++ != '{')
        return false;
    while (*p != '}') {
        char *end;
        errno = 0;
        unsigned long long g = strtoull(p, &end, 10);
        if (end == p || errno || g > UINT32_MAX || id->nshared >= PEER_SHARED_MAX ||
            (*end != ',' && *end != '}'))
            return false;
        id->shared[id->nshared++] = (uint32_t)g;
        p = *end == ',' ? end + 1 : end;
    }
    return p[1] == '\0';
}

int owners_learn(struct owners *o, const char *run_id, int64_t uid, const char *gids,
                 const char *user_id, bool keep)
{
    struct run_owner e = {.kind = uid >= 0 ? OWNER_RECORDED : OWNER_USER_ID};
    memcpy(e.run_id, run_id, PROTO_RUN_ID_LEN);
    int rc = 0;
    if (uid >= 0) {
        e.id.uid = (uint32_t)uid;
        if (uid > UINT32_MAX || !parse_gids(gids ? gids : "{}", &e.id)) {
            /* Nobody matches a row we cannot read: its events are refused, not let through. */
            e.id = (struct peer){.uid = UINT32_MAX};
            rc = -EINVAL;
        }
    } else if (user_id && strlen(user_id) <= OWNERS_USER_MAX) {
        memcpy(e.user_id, user_id, strlen(user_id) + 1);
    }
    if (rc == 0 && keep)
        cache_put(o, &e);
    struct run_owner *slot = set_find(&o->set, run_id);
    if (slot)
        *slot = e;
    return rc;
}

size_t owners_check(struct owners *o, const struct batch *b, size_t lo, size_t hi,
                    owners_refused_cb refused, void *ctx)
{
    struct owner_set *s = &o->set;
    /* Runs not in the database: the first start in the range makes its peer the owner. */
    for (size_t i = lo; i < hi; i++) {
        const struct ev *ev = &b->evs[i];
        if (ev->kind != EV_START_RUN || (ev->flags & EV_REJECTED))
            continue;
        struct run_owner *e = set_find(s, ev_run(b, ev));
        if (e == NULL || e->kind != OWNER_NONE)
            continue;
        const struct batch_peer *who = batch_ev_peer(b, ev);
        if (who) {
            e->kind = OWNER_STARTING;
            e->id = who->id;
        } else {
            /* A start journaled before peers were kept: no owner row; its user decides. */
            e->kind = OWNER_USER_ID;
            e->user_id[0] = '\0';
            if (ev->run.user.len <= OWNERS_USER_MAX) {
                memcpy(e->user_id, batch_sptr(b, ev->run.user), ev->run.user.len);
                e->user_id[ev->run.user.len] = '\0';
            }
        }
    }
    size_t n = 0;
    for (size_t i = lo; i < hi; i++) {
        const struct ev *ev = &b->evs[i];
        if (!checked(b, ev))
            continue;
        const struct run_owner *e = set_find(s, ev_run(b, ev));
        if (e == NULL || e->kind == OWNER_NONE)
            continue; /* an unknown run: the run-state check says so */
        const struct batch_peer *who = batch_ev_peer(b, ev);
        char msg[512];
        if (!owners_may_write(e, &who->id, batch_sptr(b, who->user), who->user.len, o->open_unowned,
                              msg, sizeof msg)) {
            refused(ctx, i, msg);
            n++;
        }
    }
    return n;
}

static bool share_a_group(const struct peer *a, const struct peer *b)
{
    for (int i = 0; i < a->nshared; i++)
        for (int k = 0; k < b->nshared; k++)
            if (a->shared[i] == b->shared[k])
                return true;
    return false;
}

bool owners_may_write(const struct run_owner *owner, const struct peer *id, const char *user,
                      size_t user_len, bool open_unowned, char *msg, size_t msglen)
{
    char run[PROTO_RUN_ID_LEN + 1];
    snprintf(run, sizeof run, "%.*s", PROTO_RUN_ID_LEN, owner->run_id);
    switch (owner->kind) {
    case OWNER_RECORDED:
    case OWNER_STARTING:
        if (owner->id.uid == id->uid || share_a_group(&owner->id, id))
            return true;
        snprintf(msg, msglen,
                 "Permission denied: run %s was started by uid %" PRIu32 "; uid %" PRIu32
                 " (%.*s) may not write to it. A run is written only by the uid that started "
                 "it, and by members of a group in the agent's [agent] shared_gids that both "
                 "belong to",
                 run, owner->id.uid, id->uid, (int)user_len, user);
        return false;
    case OWNER_USER_ID:
        if (open_unowned || (owner->user_id[0] && strlen(owner->user_id) == user_len &&
                             memcmp(owner->user_id, user, user_len) == 0))
            return true;
        snprintf(msg, msglen,
                 "Permission denied: run %s was not started through trackd; it belongs to the "
                 "local user named by its user_id ('%s'), and uid %" PRIu32
                 " (%.*s) may not write to it ([agent] open_unowned_runs lets anyone)",
                 run, owner->user_id, id->uid, (int)user_len, user);
        return false;
    default: return true;
    }
}
