/*
 * Journal I/O for the loop. Appends are cheap and happen where frames are read; a single
 * uv_queue_work item at a time owns the journal for a block write or an fsync, so the loop
 * never waits on the disk, and appends made meanwhile are group-committed by the next write.
 * Releases that arrive while a worker holds the journal are applied when it returns.
 */
#include "journaler.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "stats.h"
#include "util.h"

/*
 * Frame record (agent/JOURNAL.md, "Frame records"): session u64 BE | flags u8 |
 * [REC_PEER: uid u32 BE | n u8 | n x gid u32 BE] | [REC_WRITER: writer u8 | writers u8] |
 * 3 x (len u16 BE | bytes) | frame.
 */
#define REC_CONTEXT_TAGS 1
#define REC_PEER 2
#define REC_WRITER 4
#define RELEASED_FILE "committed.lsn"

/* [journal] fsync is handed to the journal as it is. */
_Static_assert((int)CONFIG_FSYNC_ALWAYS == (int)JOURNAL_FSYNC_ALWAYS &&
                   (int)CONFIG_FSYNC_INTERVAL == (int)JOURNAL_FSYNC_INTERVAL &&
                   (int)CONFIG_FSYNC_NEVER == (int)JOURNAL_FSYNC_NEVER,
               "enum config_fsync and enum journal_fsync must agree");

/* ---- replay ---------------------------------------------------------------------- */

struct replay_ctx {
    journaler_frame_cb cb;
    int (*pace)(void *);
    void *ctx;
    uint64_t bad_records;
    uint64_t committed; /* records up to here are in PostgreSQL already */
    uint64_t skipped;
};

static int replay_record(void *arg, uint8_t type, const void *payload, size_t len, uint64_t lsn)
{
    struct replay_ctx *rc = arg;
    const uint8_t *p = payload, *end = p + len;
    char strs[3][256];
    if (lsn <= rc->committed) {
        rc->skipped++;
        return 0;
    }
    if (type != JREC_FRAME || len < 9) {
        rc->bad_records++;
        return 0;
    }
    struct frame_origin o = {0};
    struct peer peer;
    o.session = util_get_be64(p);
    o.context_tags = (p[8] & REC_CONTEXT_TAGS) != 0;
    bool has_peer = (p[8] & REC_PEER) != 0, has_writer = (p[8] & REC_WRITER) != 0;
    p += 9;
    if (has_peer) {
        memset(&peer, 0, sizeof peer);
        if (end - p < 5 || p[4] > PEER_SHARED_MAX || end - p - 5 < 4 * p[4]) {
            rc->bad_records++;
            return 0;
        }
        peer.uid = util_get_be32(p);
        peer.nshared = p[4];
        p += 5;
        for (int i = 0; i < peer.nshared; i++, p += 4)
            peer.shared[i] = util_get_be32(p);
        o.peer = &peer;
    }
    if (has_writer) {
        if (end - p < 2 || p[0] >= p[1]) {
            rc->bad_records++;
            return 0;
        }
        o.writer = p[0];
        o.writers = p[1];
        p += 2;
    }
    for (int i = 0; i < 3; i++) {
        if (end - p < 2 || end - p - 2 < util_get_be16(p) || util_get_be16(p) >= sizeof strs[i]) {
            rc->bad_records++;
            return 0;
        }
        size_t n = util_get_be16(p);
        memcpy(strs[i], p + 2, n);
        strs[i][n] = '\0';
        p += 2 + n;
    }
    o.user = strs[0];
    o.source_name = strs[1];
    o.source_type = strs[2];
    struct proto_header h;
    if (end - p < PROTO_HEADER_LEN || proto_header_decode(p, PROTO_MAX_BODY_HARD, &h) != 0 ||
        (size_t)(end - p) != PROTO_HEADER_LEN + (size_t)h.body_len) {
        rc->bad_records++;
        return 0;
    }
    rc->cb(rc->ctx, &o, &h, p + PROTO_HEADER_LEN, lsn);
    return rc->pace ? rc->pace(rc->ctx) : 0;
}

int journaler_replay(const struct trackd_config *cfg, journaler_frame_cb cb, int (*pace)(void *),
                     void *ctx, struct journal_replay_stats *st, char *msg, size_t msglen)
{
    struct replay_ctx rc = {cb, pace, ctx, 0, 0, 0};
    struct journal_error err;
    memset(st, 0, sizeof *st);
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", cfg->journal_dir, RELEASED_FILE);
    FILE *f = fopen(path, "r");
    if (f) {
        unsigned long long v;
        if (fscanf(f, "%llu", &v) == 1)
            rc.committed = v;
        fclose(f);
    }
    int r = journal_replay(cfg->journal_dir, replay_record, &rc, st, &err);
    if (r < 0) {
        snprintf(msg, msglen, "journal replay failed: %s", err.message);
        return r;
    }
    if (rc.skipped)
        log_info("[journal] %llu already committed records skipped",
                 (unsigned long long)rc.skipped);
    if (rc.bad_records)
        log_warn("[journal] %llu records in %s were not frames and were skipped",
                 (unsigned long long)rc.bad_records, cfg->journal_dir);
    return r == 0 ? 0 : 1;
}

/* ---- writing ------------------------------------------------------------------ */

static void start_work(struct journaler *jr);
static void after_work_cb(uv_work_t *w, int status);

/*
 * Records up to the marker are committed: replay skips them, so a restart never applies a
 * committed tag or status again over a newer one. Written with a rename, not fsynced: after
 * a power loss an older marker only means more (idempotent) work at replay. Returns 0 or
 * -errno. Worker thread (or the loop at close, when no worker runs).
 */
static int write_marker(const char *dir, uint64_t lsn)
{
    char path[4200], tmp[4210];
    snprintf(path, sizeof path, "%s/%s", dir, RELEASED_FILE);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return -errno;
    int rc = fprintf(f, "%llu\n", (unsigned long long)lsn) < 0 ? -EIO : 0;
    if (fclose(f) != 0 && rc == 0)
        rc = -errno;
    if (rc == 0 && rename(tmp, path) != 0)
        rc = -errno;
    return rc;
}

/* Deletes the segments below lsn and moves the marker: the work item's release part. */
static void release_now(struct journaler *jr)
{
    jr->release_deleted =
        jr->work_journal ? journal_release(jr->work_journal, jr->work_release) : 0;
    jr->marker_rc = write_marker(jr->cfg->journal_dir, jr->work_release);
}

/* Loop: what the release part of the next work item has done, logged. */
static void release_done(struct journaler *jr)
{
    if (jr->release_deleted < 0)
        log_limited(LOG_WARN, "[journal] cannot delete committed segments: %s",
                    strerror(-jr->release_deleted));
    else if (jr->release_deleted > 0)
        log_debug("[journal] %d committed segment(s) deleted", jr->release_deleted);
    if (jr->marker_rc != 0)
        log_limited(LOG_WARN, "[journal] cannot record the committed position in %s/%s: %s",
                    jr->cfg->journal_dir, RELEASED_FILE, strerror(-jr->marker_rc));
    stats.journal_releases++;
    jr->released_lsn = jr->work_release;
    jr->work_release = 0;
    if (jr->cbs.released)
        jr->cbs.released(jr->ctx);
}

/* The position the next work item may release: only records that reached the disk (an
 * unwritten LSN may be issued again after a crash); 0 when there is nothing new. */
static uint64_t releasable(const struct journaler *jr)
{
    uint64_t lsn = jr->release_lsn;
    if (jr->j != NULL && jr->durable_lsn < lsn)
        lsn = jr->durable_lsn;
    return lsn > jr->released_lsn ? lsn : 0;
}

/* Worker thread: the only code touching the journal while jr->writing is set. */
static void work_cb(uv_work_t *w)
{
    struct journaler *jr = w->data;
    jr->write_rc = 0;
    if (jr->work == JW_SYNC)
        jr->write_rc = journal_sync(jr->work_journal, &jr->err);
    else if (jr->work == JW_WRITE)
        jr->write_rc = journal_write_block(jr->work_journal, jr->inflight, &jr->err);
    if (jr->work_release)
        release_now(jr);
}

/* Queues a work item of kind (JW_RELEASE: the release part only), with whatever release is
 * due riding along. */
static void queue_work(struct journaler *jr, enum journaler_work kind)
{
    jr->work = kind;
    jr->work_journal = jr->j;
    jr->work_release = releasable(jr);
    if (kind == JW_RELEASE && jr->work_release == 0)
        return;
    jr->writing = true;
    jr->work_req.data = jr;
    if (uv_queue_work(jr->loop, &jr->work_req, work_cb, after_work_cb) != 0) {
        jr->writing = false;
        jr->work_release = 0;
    }
}

#define RETRY_MIN_MS 100
#define RETRY_MAX_MS 5000

static void retry_cb(uv_timer_t *t)
{
    start_work(t->data);
}

/*
 * A write or fsync failed. A full disk (ENOSPC, EDQUOT) or an I/O error does not go away by
 * trying again at once: clients stop being read, the same block is tried again after 100 ms
 * doubling to 5 s (jittered), and the first success resumes everything. Nothing is dropped: the
 * block stays in memory, and its frames stay unacknowledged.
 */
static void write_failed(struct journaler *jr)
{
    int e = -jr->write_rc;
    bool full = e == ENOSPC || e == EDQUOT;
    stats.journal_write_errors++;
    if (jr->failures++ == 0) {
        if (full)
            stats.journal_full++;
        jr->cbs.stalled(jr->ctx, true);
    }
    uint64_t ms = util_backoff_ms(jr->failures, RETRY_MIN_MS, RETRY_MAX_MS, (uint32_t)rand());
    log_limited(LOG_ERROR,
                "[journal] %s in %s failed: %s; %s; clients are not read and acknowledgements "
                "wait; trying again in %llu ms",
                jr->work == JW_SYNC ? "fsync" : "write", jr->cfg->journal_dir, jr->err.message,
                full ? "the file system is full: free space there (or lower [journal] quota_bytes "
                       "below what it can hold)"
                     : "check the disk and the kernel log",
                (unsigned long long)ms);
    uv_timer_start(&jr->retry_timer, retry_cb, ms, 0);
}

static void after_work_cb(uv_work_t *w, int status)
{
    struct journaler *jr = w->data;
    jr->writing = false;
    if (status == 0 && jr->work_release)
        release_done(jr);
    jr->work_release = 0;
    if (jr->j == NULL && jr->closing)
        return; /* stopped during the replay: journaler_close has finished */
    bool wrote = jr->work == JW_WRITE || jr->work == JW_SYNC;
    bool failed = wrote && status == 0 && jr->write_rc != 0;
    if (wrote && !failed && status == 0 && jr->failures) {
        log_info("[journal] writing works again after %u failed attempt(s): resuming clients",
                 jr->failures);
        jr->failures = 0;
        jr->cbs.stalled(jr->ctx, false);
    }
    if (jr->work == JW_WRITE && status == 0 && jr->write_rc == 0) {
        uint64_t last = journal_block_last_lsn(jr->inflight);
        stats.journal_blocks++;
        journal_block_free(jr->inflight);
        jr->inflight = NULL;
        jr->dirty = true;
        if (last > jr->durable_lsn)
            jr->durable_lsn = last;
        jr->cbs.durable(jr->ctx, jr->durable_lsn);
    } else if (jr->work == JW_SYNC && status == 0 && jr->write_rc == 0) {
        jr->dirty = false;
    }
    if (jr->closing) {
        journaler_close(jr, jr->closed);
        return;
    }
    if (failed) {
        write_failed(jr);
        queue_work(jr, JW_RELEASE); /* releasing frees space, which a full disk needs */
        return;
    }
    start_work(jr);
}

/*
 * Gives the journal to a worker: the block that failed before, else the open block, with the
 * release that is due; or the release alone. While a failed write waits for its retry, only
 * releases go.
 */
static void start_work(struct journaler *jr)
{
    if (jr->writing || jr->closing)
        return;
    if (jr->j != NULL && !uv_is_active((uv_handle_t *)&jr->retry_timer)) {
        if (jr->inflight == NULL)
            jr->inflight = journal_seal(jr->j);
        if (jr->inflight != NULL) {
            queue_work(jr, JW_WRITE);
            return;
        }
    }
    queue_work(jr, JW_RELEASE);
}

static void sync_timer_cb(uv_timer_t *t)
{
    struct journaler *jr = t->data;
    if (jr->writing || !jr->dirty || jr->closing || jr->failures)
        return;
    queue_work(jr, JW_SYNC);
}

void journaler_init(struct journaler *jr, uv_loop_t *loop, const struct trackd_config *cfg,
                    const struct journaler_cbs *cbs, void *ctx)
{
    memset(jr, 0, sizeof *jr);
    jr->loop = loop;
    jr->cfg = cfg;
    jr->cbs = *cbs;
    jr->ctx = ctx;
}

int journaler_open(struct journaler *jr, char *msg, size_t msglen)
{
    const struct trackd_config *cfg = jr->cfg;
    struct journal_config jc = {
        .dir = cfg->journal_dir,
        .quota_bytes = cfg->journal_quota_bytes,
        .segment_bytes = cfg->journal_segment_bytes,
        .fsync = cfg->journal_fsync,
        .fsync_interval_ms = cfg->journal_fsync_interval_ms,
        .zstd_level = 1,
    };
    struct journal_error err;
    int orc = journal_open(&jr->j, &jc, &err);
    if (orc != 0) {
        snprintf(msg, msglen, "cannot open the journal in %s: %s", cfg->journal_dir, err.message);
        return orc;
    }
    struct journal_usage u;
    journal_usage(jr->j, &u);
    jr->appended_lsn = jr->durable_lsn = u.next_lsn ? u.next_lsn - 1 : 0;
    if (jr->released_lsn) {
        /* Committed during the replay: those segments can go now. */
        int n = journal_release(jr->j, jr->released_lsn);
        if (n < 0)
            log_limited(LOG_WARN, "[journal] cannot delete committed segments: %s", strerror(-n));
    }
    uv_timer_init(jr->loop, &jr->sync_timer);
    uv_timer_init(jr->loop, &jr->retry_timer);
    jr->sync_timer.data = jr->retry_timer.data = jr;
    if (jc.fsync == JOURNAL_FSYNC_INTERVAL)
        uv_timer_start(&jr->sync_timer, sync_timer_cb, cfg->journal_fsync_interval_ms,
                       cfg->journal_fsync_interval_ms);
    log_info("[journal] %s: %llu bytes on disk, fsync %s", cfg->journal_dir,
             (unsigned long long)u.disk_bytes, config_fsync_name(cfg->journal_fsync));
    return 0;
}

int journaler_append(struct journaler *jr, const struct frame_origin *o,
                     const struct proto_header *h, const uint8_t *body, uint64_t *lsn)
{
    const char *strs[3] = {o->user, o->source_name, o->source_type};
    size_t lens[3], n = 9 + PROTO_HEADER_LEN + h->body_len;
    if (o->peer)
        n += 5 + 4 * (size_t)o->peer->nshared;
    if (o->writers)
        n += 2;
    for (int i = 0; i < 3; i++) {
        lens[i] = strlen(strs[i]);
        if (lens[i] > 255)
            lens[i] = 255;
        n += 2 + lens[i];
    }
    uint8_t stackbuf[4096];
    uint8_t *rec = n <= sizeof stackbuf ? stackbuf : malloc(n);
    if (rec == NULL)
        return -ENOMEM;
    uint8_t *p = rec;
    util_put_be64(p, o->session);
    p += 8;
    *p++ = (uint8_t)((o->context_tags ? REC_CONTEXT_TAGS : 0) | (o->peer ? REC_PEER : 0) |
                     (o->writers ? REC_WRITER : 0));
    if (o->peer) {
        util_put_be32(p, o->peer->uid);
        p[4] = o->peer->nshared;
        p += 5;
        for (int i = 0; i < o->peer->nshared; i++, p += 4)
            util_put_be32(p, o->peer->shared[i]);
    }
    if (o->writers) {
        p[0] = o->writer;
        p[1] = o->writers;
        p += 2;
    }
    for (int i = 0; i < 3; i++) {
        util_put_be16(p, (uint16_t)lens[i]);
        memcpy(p + 2, strs[i], lens[i]);
        p += 2 + lens[i];
    }
    proto_header_encode(p, h);
    memcpy(p + PROTO_HEADER_LEN, body, h->body_len);
    int rc = journal_append(jr->j, JREC_FRAME, rec, n, lsn);
    if (rec != stackbuf)
        free(rec);
    if (rc == 0) {
        jr->appended_lsn = *lsn;
        stats.journal_records++;
    }
    return rc;
}

void journaler_kick(struct journaler *jr)
{
    start_work(jr);
}

void journaler_release(struct journaler *jr, uint64_t lsn)
{
    if (lsn > jr->release_lsn)
        jr->release_lsn = lsn;
    start_work(jr); /* or, a worker holding the journal, when it returns */
}

void journaler_usage(const struct journaler *jr, uint64_t *bytes, uint64_t *quota)
{
    struct journal_usage u = {0};
    if (jr->j)
        journal_usage(jr->j, &u);
    *bytes = u.disk_bytes + u.pending_bytes;
    *quota = jr->cfg->journal_quota_bytes;
}

static void timer_closed(uv_handle_t *h)
{
    struct journaler *jr = h->data;
    if (!uv_is_closing((uv_handle_t *)&jr->retry_timer)) {
        uv_close((uv_handle_t *)&jr->retry_timer, timer_closed);
        return;
    }
    journal_close(jr->j);
    jr->j = NULL;
    if (jr->closed)
        jr->closed(jr);
}

void journaler_close(struct journaler *jr, void (*closed)(struct journaler *))
{
    jr->closing = true;
    jr->closed = closed;
    if (jr->j == NULL) {
        /* Never opened (stopped during the replay): no handle to close. */
        if (closed)
            closed(jr);
        return;
    }
    if (jr->writing)
        return; /* after_work_cb comes back here */
    if (jr->inflight) {
        journal_block_free(jr->inflight);
        jr->inflight = NULL;
    }
    /* The last release, on the loop: nothing else runs any more. */
    jr->work_journal = jr->j;
    jr->work_release = releasable(jr);
    if (jr->work_release) {
        release_now(jr);
        release_done(jr);
    }
    if (!uv_is_closing((uv_handle_t *)&jr->sync_timer)) {
        uv_timer_stop(&jr->sync_timer);
        uv_timer_stop(&jr->retry_timer);
        uv_close((uv_handle_t *)&jr->sync_timer, timer_closed);
    }
}
