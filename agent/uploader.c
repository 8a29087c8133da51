/*
 * The uploader (uploader.h): an artifact's states, the queues and timers that move it, and the
 * rules for what each outcome means to the client, the ledger and the counters. File I/O is
 * spool.c's and transports.c's, on worker threads.
 */
#include "uploader.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "destination.h"
#include "log.h"
#include "stats.h"
#include "util.h"

static void start_uploads(struct uploader *up);
static void start_forget(struct uploader *up, struct artifact *a);

const char *artifact_state_name(enum artifact_state s)
{
    switch (s) {
#define ARTIFACT_STATE_NAME(name, text)                                                            \
    case ARTIFACT_##name: return text;
        ARTIFACT_STATES(ARTIFACT_STATE_NAME)
#undef ARTIFACT_STATE_NAME
    }
    return "?";
}

/*
 * The one place an artifact changes state: logged, and counted on the way in. a->rc is the
 * outcome that led here (RECORD: 0 uploaded, else failed for good).
 */
static void set_state(struct artifact *a, enum artifact_state s)
{
    log_debug("[artifacts] %s (%s): %s -> %s", a->e.id, a->e.path, artifact_state_name(a->state),
              artifact_state_name(s));
    switch (s) {
    case ARTIFACT_LEDGER:
        if (a->state == ARTIFACT_SNAPSHOT)
            stats.artifacts_received++;
        break;
    case ARTIFACT_RETRY_WAIT: stats.artifact_retries++; break;
    case ARTIFACT_RECORD:
        if (a->rc == 0) {
            stats.artifacts_uploaded++;
            stats.artifact_bytes_uploaded += a->e.size;
        } else {
            stats.artifacts_failed++;
        }
        break;
    default: break;
    }
    a->state = s;
}

/* A worker holds it: nothing else may touch it until the worker's end. */
static bool at_work(const struct artifact *a)
{
    return a->state == ARTIFACT_SNAPSHOT || a->state == ARTIFACT_UPLOAD ||
           a->state == ARTIFACT_FORGET;
}

/* ---- the live list ------------------------------------------------------------------------ */

struct artifact *uploader_find(struct uploader *up, const char *id)
{
    for (struct artifact *a = up->live; a; a = a->next)
        if (strcmp(a->e.id, id) == 0)
            return a;
    return NULL;
}

static struct artifact *new_artifact(struct uploader *up, enum artifact_state s)
{
    struct artifact *a = calloc(1, sizeof *a);
    if (a == NULL)
        return NULL;
    a->up = up;
    a->fd = -1;
    a->state = s;
    a->next = up->live;
    up->live = a;
    up->nlive++;
    return a;
}

/* Gone for everyone at once: no lookup finds it, nothing counts it. */
static void unlink_live(struct uploader *up, struct artifact *a)
{
    for (struct artifact **p = &up->live; *p; p = &(*p)->next) {
        if (*p == a) {
            *p = a->next;
            up->nlive--;
            break;
        }
    }
    stats.artifacts_pending = up->nlive;
}

static void free_artifact(struct artifact *a)
{
    if (a->fd >= 0)
        close(a->fd);
    free(a->store_uri);
    free(a->store_root);
    free(a);
}

/* Artifacts held for uid: bounded per user so that one cannot take every slot. */
static size_t live_of_uid(const struct uploader *up, uint32_t uid)
{
    size_t n = 0;
    for (const struct artifact *a = up->live; a; a = a->next)
        n += a->e.has_peer && a->e.peer.uid == uid;
    return n;
}

/*
 * The loop's side of a worker's end: a cancelled work item (status) fails the artifact with
 * why; while the uploader closes, the artifact is freed instead (its spool copy stays for the
 * next start) and true returned.
 */
static bool worker_ended(struct artifact *a, int status, const char *why)
{
    if (status != 0 && a->rc == 0) {
        a->rc = status;
        snprintf(a->msg, sizeof a->msg, "%s", why);
    }
    if (!a->up->closing)
        return false;
    unlink_live(a->up, a);
    free_artifact(a);
    return true;
}

/* ---- SNAPSHOT and ROOM_WAIT ---------------------------------------------------------------- */

static void snapshot_work(uv_work_t *w)
{
    struct artifact *a = w->data;
    const struct spool *s = &a->up->spool;
    a->msg[0] = '\0';
    a->rc = spool_check(s, &a->e, a->fd, a->msg, sizeof a->msg);
    if (a->rc == 0)
        a->rc = spool_copy(s, &a->e, a->fd, &a->seen, a->msg, sizeof a->msg);
    if (a->rc != -ENOSPC && a->rc != -EDQUOT) {
        close(a->fd); /* kept to copy again once the disk has room */
        a->fd = -1;
    }
}

static void snapshot_done(uv_work_t *w, int status);

static int start_snapshot(struct uploader *up, struct artifact *a)
{
    set_state(a, ARTIFACT_SNAPSHOT);
    a->work.data = a;
    return uv_queue_work(up->loop, &a->work, snapshot_work, snapshot_done) == 0 ? 0 : -EAGAIN;
}

static void space_cb(uv_timer_t *t);

/*
 * No room in the spool (a full disk, a quota): the snapshot waits, holding the client's
 * descriptor, and so does its connection, whose later frames stay unread. Tried again after
 * 100 ms doubling to 5 s (jittered); the first one that fits resumes the rest, in order. An
 * artifact that had waited before keeps its place at the head (again: the worker found no room).
 */
static void wait_for_space(struct uploader *up, struct artifact *a)
{
    if (up->space_wait == NULL && up->space_failures == 0)
        stats.artifact_spool_full++;
    set_state(a, ARTIFACT_ROOM_WAIT);
    if (a->waited) {
        a->qnext = up->space_wait;
        up->space_wait = a;
    } else {
        a->qnext = NULL;
        struct artifact **p = &up->space_wait;
        while (*p)
            p = &(*p)->qnext;
        *p = a; /* first come, first copied */
        a->waited = true;
    }
    if (uv_is_active((uv_handle_t *)&up->space_timer))
        return;
    uint64_t ms = util_backoff_ms(up->space_failures + 1, UPLOADER_SPACE_RETRY_MIN_MS,
                                  UPLOADER_SPACE_RETRY_MAX_MS, (uint32_t)rand());
    up->space_failures++;
    char size[48] = "";
    if (a->e.size) /* known once a worker has looked at the file */
        snprintf(size, sizeof size, " (%" PRIu64 " bytes)", a->e.size);
    log_limited(LOG_ERROR,
                "[artifacts] the spool %s has no room for %s%s and room to spare for the "
                "journal: free space there; its client waits, trying again in %" PRIu64 " ms",
                up->spool.dir, a->e.path, size, ms);
    uv_timer_start(&up->space_timer, space_cb, ms, 0);
}

/* Tries the first waiting snapshot again; its worker looks for room before it copies. */
static void resume_waiting(struct uploader *up)
{
    struct artifact *a = up->space_wait;
    if (a == NULL)
        return;
    up->space_wait = a->qnext;
    a->qnext = NULL;
    if (start_snapshot(up, a) != 0)
        wait_for_space(up, a);
}

static void space_cb(uv_timer_t *t)
{
    resume_waiting(t->data);
}

/* Spooled (or recovered from the spool): its "pending" row goes to the database. */
static void to_ledger(struct uploader *up, struct artifact *a)
{
    set_state(a, ARTIFACT_LEDGER);
    stats.artifacts_pending = up->nlive;
    a->serial = up->cbs.ledger(up->ctx, a);
    if (a->serial == 0)
        log_error("[artifacts] out of memory queueing %s; it is retried at the next start",
                  a->e.id);
    else
        up->cbs.hold(up->ctx, a->conn_id, a->serial, true);
}

/* The snapshot failed or was refused: the frame is answered, the artifact freed. */
static void snapshot_failed(struct uploader *up, struct artifact *a)
{
    char text[800];
    snprintf(text, sizeof text, "artifact '%.200s' not taken: %.500s", a->e.path, a->msg);
    if (a->rc == -ESTALE)
        stats.artifacts_changed++;
    if (a->rc == -EEXIST) {
        stats.duplicates_dropped++; /* resent after a restart: the spool already holds it */
    } else {
        log_limited(LOG_WARN, "[artifacts] %s (%s): %s", a->e.id, a->e.path, a->msg);
        if (uploader_refused(a->rc))
            stats.artifacts_failed++; /* refused at the door: nothing accepted to dead-letter */
        else
            up->cbs.failed(up->ctx, a, a->msg, false);
    }
    unlink_live(up, a);
    up->cbs.taken(up->ctx, a, a->rc, text);
    free_artifact(a);
}

static void snapshot_done(uv_work_t *w, int status)
{
    struct artifact *a = w->data;
    struct uploader *up = a->up;
    bool waited = a->waited;
    if (worker_ended(a, status, "snapshot cancelled"))
        return;
    if (a->rc == -ENOSPC || a->rc == -EDQUOT) {
        /* The disk filled during the copy: the partial copy is gone, the descriptor kept. */
        a->rc = 0;
        wait_for_space(up, a);
        return;
    }
    if (a->rc != 0) {
        snapshot_failed(up, a);
    } else {
        to_ledger(up, a);
        up->cbs.taken(up->ctx, a, 0, "");
    }
    if (waited) {
        /* The head of the queue is done with: the next one goes. */
        if (up->space_wait == NULL && up->space_failures) {
            log_info("[artifacts] the spool has room again after %u attempt(s)",
                     up->space_failures);
            up->space_failures = 0;
        }
        resume_waiting(up);
    }
}

/* ---- QUEUED, UPLOAD and RETRY_WAIT ---------------------------------------------------------- */

static void upload_work(uv_work_t *w)
{
    struct artifact *a = w->data;
    struct transport_put p = {&a->up->spool, &a->e, a->store_uri, a->store_root, a->store_below};
    a->msg[0] = '\0';
    a->rc = transport_put(&a->up->transports, &p, a->msg, sizeof a->msg);
}

static void enqueue(struct uploader *up, struct artifact *a)
{
    set_state(a, ARTIFACT_QUEUED);
    a->qnext = NULL;
    if (up->qtail)
        up->qtail->qnext = a;
    else
        up->qhead = a;
    up->qtail = a;
}

static void retry_cb(uv_timer_t *t)
{
    struct uploader *up = t->data;
    uint64_t now = uv_now(up->loop);
    struct artifact **p = &up->retry;
    while (*p) {
        struct artifact *a = *p;
        if (a->retry_at > now) {
            p = &a->qnext;
            continue;
        }
        *p = a->qnext;
        enqueue(up, a);
    }
    if (up->retry == NULL)
        uv_timer_stop(&up->retry_timer);
    start_uploads(up);
}

static void schedule_retry(struct uploader *up, struct artifact *a)
{
    log_limited(LOG_WARN, "[artifacts] upload of %s (%s) failed: %s; retrying (attempt %u)",
                a->e.id, a->e.path, a->msg, a->attempts + 1);
    set_state(a, ARTIFACT_RETRY_WAIT);
    uint64_t ms = util_backoff_ms(a->attempts, UPLOADER_RETRY_MIN_MS, UPLOADER_RETRY_MAX_MS,
                                  (uint32_t)rand());
    a->retry_at = uv_now(up->loop) + ms;
    a->qnext = up->retry;
    up->retry = a;
    if (!uv_is_active((uv_handle_t *)&up->retry_timer))
        uv_timer_start(&up->retry_timer, retry_cb, 250, 250);
}

/*
 * Uploaded (rc 0) or given up on: the error goes out before the hold is released, so a flush
 * waiting for this upload answers after it and flush() never returns before the failure is in
 * the client; then the final row.
 */
static void finish(struct uploader *up, struct artifact *a, int rc, const char *msg)
{
    a->rc = rc;
    if (rc != 0) {
        char text[700];
        snprintf(text, sizeof text, "artifact '%.200s' of run %s: %.400s", a->e.path, a->e.run_id,
                 msg);
        up->cbs.failed(up->ctx, a, text, true);
    }
    set_state(a, ARTIFACT_RECORD);
    up->cbs.hold(up->ctx, a->conn_id, a->serial, false);
    if (up->cbs.record(up->ctx, a, rc == 0 ? "done" : "failed", rc == 0 ? NULL : msg) != 0)
        log_error("[artifacts] out of memory recording %s; it is uploaded again at the next "
                  "start",
                  a->e.id);
}

static void upload_done(uv_work_t *w, int status)
{
    struct artifact *a = w->data;
    struct uploader *up = a->up;
    up->running--;
    if (worker_ended(a, status, "upload cancelled"))
        return;
    if (a->rc == 0) {
        log_debug("[artifacts] %s uploaded to %s (%" PRIu64 " bytes)", a->e.id, a->store_uri,
                  a->e.size);
    } else if (transports_retryable(a->rc) && a->attempts < UPLOADER_MAX_ATTEMPTS) {
        schedule_retry(up, a);
        start_uploads(up);
        return;
    } else {
        log_limited(LOG_WARN,
                    "[artifacts] upload of %s (%s) failed for good after %u attempt(s): %s",
                    a->e.id, a->e.path, a->attempts, a->msg);
    }
    finish(up, a, a->rc, a->msg);
    start_uploads(up);
}

static void start_uploads(struct uploader *up)
{
    while (!up->closing && up->qhead && up->running < UPLOADER_MAX_UPLOADS) {
        struct artifact *a = up->qhead;
        up->qhead = a->qnext;
        if (up->qhead == NULL)
            up->qtail = NULL;
        a->qnext = NULL;
        a->work.data = a;
        a->attempts++;
        set_state(a, ARTIFACT_UPLOAD);
        if (uv_queue_work(up->loop, &a->work, upload_work, upload_done) != 0) {
            finish(up, a, -EAGAIN, "cannot start a worker");
            continue;
        }
        up->running++;
    }
}

/* ---- FORGET ---------------------------------------------------------------------------------- */

static void forget_work(uv_work_t *w)
{
    struct artifact *a = w->data;
    a->rc = spool_remove(&a->up->spool, a->e.id, a->msg, sizeof a->msg);
}

static void forget_done(uv_work_t *w, int status)
{
    struct artifact *a = w->data;
    if (status == 0 && a->rc != 0)
        log_limited(LOG_WARN, "[artifacts] %s", a->msg);
    free_artifact(a);
}

/* Out of its queue, out of the live list, and its spool copy deleted on a worker (deleting a
 * large file takes the file system a while). A worker's artifact is left to the worker's end. */
static void start_forget(struct uploader *up, struct artifact *a)
{
    if (at_work(a))
        return;
    struct artifact **queue = a->state == ARTIFACT_QUEUED       ? &up->qhead
                              : a->state == ARTIFACT_RETRY_WAIT ? &up->retry
                              : a->state == ARTIFACT_ROOM_WAIT  ? &up->space_wait
                                                                : NULL;
    for (struct artifact **p = queue; p && *p; p = &(*p)->qnext) {
        if (*p == a) {
            *p = a->qnext;
            break;
        }
    }
    if (queue == &up->qhead) {
        up->qtail = NULL;
        for (struct artifact *q = up->qhead; q; q = q->qnext)
            up->qtail = q;
    }
    unlink_live(up, a);
    set_state(a, ARTIFACT_FORGET);
    a->work.data = a;
    if (uv_queue_work(up->loop, &a->work, forget_work, forget_done) != 0) {
        forget_work(&a->work);
        forget_done(&a->work, 0);
    }
}

/* ---- public ------------------------------------------------------------------------------ */

int uploader_init(struct uploader *up, uv_loop_t *loop, const struct trackd_config *cfg,
                  const struct s3_config *s3, const struct uploader_cbs *cbs, void *ctx, char *msg,
                  size_t msglen)
{
    memset(up, 0, sizeof *up);
    up->loop = loop;
    up->cfg = cfg;
    up->cbs = *cbs;
    up->ctx = ctx;
    transports_init(&up->transports, cfg->mlflow_server_url, s3);
    int rc = spool_open(&up->spool, cfg->journal_dir, msg, msglen);
    if (rc != 0)
        return rc;
    uv_timer_init(loop, &up->retry_timer);
    uv_timer_init(loop, &up->space_timer);
    up->retry_timer.data = up->space_timer.data = up;
    return 0;
}

const char *uploader_path_problem(const char *path, size_t len)
{
    if (len == 0)
        return "the artifact path is empty";
    if (len > ARTIFACT_PATH_MAX)
        return "the artifact path is longer than 1024 bytes";
    if (path[0] == '/')
        return "the artifact path must be relative to the run's artifact root";
    size_t seg = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || path[i] == '/') {
            const char *s = path + seg;
            size_t n = i - seg;
            if (n == 0)
                return "the artifact path has an empty segment ('//' or a trailing '/')";
            if ((n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.'))
                return "the artifact path may not contain '.' or '..' segments";
            seg = i + 1;
        } else if ((unsigned char)path[i] < 0x20 || path[i] == 0x7f) {
            return "the artifact path contains a control character";
        }
    }
    return NULL;
}

int uploader_snapshot(struct uploader *up, const struct artifact_origin *o, const char *run_id,
                      struct proto_str path, const struct proto_file_seen *seen, int fd,
                      struct artifact **out)
{
    char id[40];
    snprintf(id, sizeof id, "%016" PRIx64 "-%016" PRIx64, o->session, o->seq);
    int rc = 0;
    struct artifact *held = uploader_find(up, id);
    if (held != NULL) {
        rc = -EEXIST;
        /* Resent by its client after a restart of the agent (or of the client's connection):
         * that client's flush barriers wait for the upload, not those of the one it came by. */
        if (held->serial != 0 &&
            (held->state == ARTIFACT_LEDGER || held->state == ARTIFACT_QUEUED ||
             held->state == ARTIFACT_UPLOAD || held->state == ARTIFACT_RETRY_WAIT)) {
            held->conn_id = o->conn_id;
            up->cbs.hold(up->ctx, held->conn_id, held->serial, true);
        }
    } else if (up->closing || up->nlive >= UPLOADER_MAX_LIVE)
        rc = -ENOBUFS;
    else if (o->peer && live_of_uid(up, o->peer->uid) >= UPLOADER_MAX_LIVE_PER_UID)
        rc = -EDQUOT;
    struct artifact *a = rc == 0 ? new_artifact(up, ARTIFACT_SNAPSHOT) : NULL;
    if (a == NULL) {
        close(fd);
        return rc ? rc : -ENOMEM;
    }
    snprintf(a->e.id, sizeof a->e.id, "%s", id);
    a->conn_id = o->conn_id;
    a->seq = o->seq;
    if (o->peer) {
        a->e.has_peer = true;
        a->e.peer = *o->peer;
        snprintf(a->e.user, sizeof a->e.user, "%s", o->user ? o->user : "");
    }
    a->fd = fd;
    a->seen = *seen;
    memcpy(a->e.run_id, run_id, PROTO_RUN_ID_LEN);
    snprintf(a->e.path, sizeof a->e.path, "%.*s", (int)path.len, path.ptr);
    *out = a;
    /* Everything that touches a disk (is it spooled already? a regular file? room for it?)
     * is the worker's: spool_check. Behind others that wait for room, it waits too. */
    if (up->space_wait != NULL) {
        wait_for_space(up, a);
        return 0;
    }
    if (start_snapshot(up, a) != 0) {
        unlink_live(up, a);
        free_artifact(a);
        return -EAGAIN;
    }
    return 0;
}

static int recovered(void *ctx, const struct spool_entry *e)
{
    struct uploader *up = ctx;
    if (uploader_find(up, e->id) != NULL) {
        log_warn("[artifacts] %s is in the spool twice; left in place", e->id);
        return 1;
    }
    struct artifact *a = new_artifact(up, ARTIFACT_LEDGER);
    if (a == NULL)
        return -ENOMEM;
    a->e = *e;
    to_ledger(up, a);
    return 0;
}

int uploader_recover(struct uploader *up)
{
    return spool_recover(&up->spool, recovered, up);
}

void uploader_committed(struct uploader *up, const char *id, const char *store_uri,
                        const char *status)
{
    struct artifact *a = uploader_find(up, id);
    if (a == NULL || a->state != ARTIFACT_LEDGER)
        return; /* recorded twice (a replay): the first one is at work */
    if (strcmp(status, "pending") != 0) {
        /* Uploaded (or given up on) before a restart: only the spool copy is left to delete. */
        up->cbs.hold(up->ctx, a->conn_id, a->serial, false);
        start_forget(up, a);
        return;
    }
    /* Only where the operator allows, and below a local root without following links. */
    char why[700], root[4200];
    const char *below = NULL;
    if (destination_problem(up->cfg, store_uri, strlen(store_uri), why, sizeof why)) {
        finish(up, a, -EPERM, why);
        return;
    }
    bool local = destination_local_root(up->cfg, store_uri, root, sizeof root, &below) == 0;
    a->store_uri = strdup(store_uri);
    a->store_root = local ? strdup(root) : NULL;
    if (a->store_uri == NULL || (local && a->store_root == NULL)) {
        finish(up, a, -ENOMEM, "out of memory");
        return;
    }
    a->store_below = local ? a->store_uri + (below - store_uri) : NULL;
    enqueue(up, a);
    start_uploads(up);
}

void uploader_recorded(struct uploader *up, const char *id)
{
    struct artifact *a = uploader_find(up, id);
    if (a)
        start_forget(up, a); /* a worker's (a resend recorded meanwhile): its end records it */
}

void uploader_rejected(struct uploader *up, const char *id)
{
    struct artifact *a = uploader_find(up, id);
    if (a == NULL)
        return;
    /* Only now may a flush barrier waiting for this artifact answer: after its error. */
    up->cbs.hold(up->ctx, a->conn_id, a->serial, false);
    start_forget(up, a);
}

static void timer_closed(uv_handle_t *h)
{
    struct uploader *up = h->data;
    if (!uv_is_closing((uv_handle_t *)&up->space_timer)) {
        uv_close((uv_handle_t *)&up->space_timer, timer_closed);
        return;
    }
    if (up->closed)
        up->closed(up);
}

void uploader_close(struct uploader *up, void (*closed)(struct uploader *))
{
    up->closing = true;
    up->closed = closed;
    up->qhead = up->qtail = up->retry = up->space_wait = NULL;
    uv_timer_stop(&up->retry_timer);
    uv_timer_stop(&up->space_timer);
    uv_close((uv_handle_t *)&up->retry_timer, timer_closed);
    struct artifact *a = up->live, *next;
    for (; a; a = next) {
        next = a->next;
        if (!at_work(a)) {
            unlink_live(up, a);
            free_artifact(a);
        }
    }
}
