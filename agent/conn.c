/*
 * Per-connection I/O and protocol state. Reads land in the connection's
 * proto_reader, so a frame split at any byte is reassembled without copies;
 * a malformed frame gets one ERROR frame and the connection is closed, while
 * a bad event inside a good frame only costs that event.
 *
 * Every connection is bounded: replies queued for a client that does not read
 * them (max_reply_bytes), frames per second (max_frames_per_sec, by reading
 * that client more slowly), time to say hello, time to finish a frame and,
 * optionally, idle time. Incomplete frames over all connections share one
 * memory budget (max_read_buffer_bytes). Each limit has a counter and a log
 * line naming the peer.
 */
#define _GNU_SOURCE /* struct ucred */
#include "conn.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "uploader.h"
#include "config.h"
#include "ingest.h"
#include "journaler.h"
#include "log.h"
#include "stats.h"

#define READ_CHUNK (64 * 1024)
#define SWEEP_MS 100
#define RATE_WINDOW_MS 1000
#define PEER_GROUPS_MAX 1024
#define STR_(x) #x
#define XSTR(x) STR_(x) /* supplementary groups read from SO_PEERGROUPS */

struct out_req {
    uv_write_t req;
    struct conn *c;
    struct proto_buf buf;
};

static void conn_close(struct conn *c);
static void apply_reading(struct conn_server *s);
static bool conn_may_read(const struct conn *c);
static void stop_reading(struct conn *c);
static void shed_reader_memory(struct conn_server *s);
static void start_reading(struct conn *c);

static void conn_sweep(uv_timer_t *t);

int conn_server_init(struct conn_server *s, uv_loop_t *loop, const struct trackd_config *cfg,
                     struct ingest *ingest, char *msg, size_t msglen)
{
    memset(s, 0, sizeof *s);
    s->loop = loop;
    s->cfg = cfg;
    s->ingest = ingest;
    s->next_id = 1;
    int rc = identity_rules_parse(&s->rules, cfg->allowed_uids, cfg->allowed_gids, cfg->shared_gids,
                                  msg, msglen);
    if (rc != 0)
        return rc;
    /* Room for every connection plus as many sessions that recently went away. */
    if (session_table_init(&s->sessions, (size_t)cfg->max_connections * 4) != 0) {
        identity_rules_free(&s->rules);
        snprintf(msg, msglen, "out of memory");
        return -ENOMEM;
    }
    if (users_init(&s->users, loop) != 0) {
        session_table_free(&s->sessions);
        identity_rules_free(&s->rules);
        snprintf(msg, msglen, "out of memory");
        return -ENOMEM;
    }
    /* Before the loop serves anyone: `trackd stats`, run as the agent's user, never waits. */
    users_prime(&s->users, geteuid());
    uv_timer_init(loop, &s->sweep);
    s->sweep.data = s;
    return 0;
}

void conn_server_start(struct conn_server *s)
{
    s->window_start_ms = uv_now(s->loop);
    uv_timer_start(&s->sweep, conn_sweep, SWEEP_MS, SWEEP_MS);
}

void conn_server_free(struct conn_server *s)
{
    session_table_free(&s->sessions);
    identity_rules_free(&s->rules);
    users_free(&s->users);
}

static void set_state(struct conn *c, enum conn_state st)
{
    static const char *const names[] = {"resolving", "hello", "open", "closing"};
    if (c->state != st)
        log_debug("[conn %u] %s -> %s", c->id, names[c->state], names[st]);
    c->state = st;
}

struct conn *conn_find(struct conn_server *s, uint32_t id)
{
    for (struct conn *c = s->head; c; c = c->next)
        if (c->id == id)
            return c;
    return NULL;
}

/* ---- writing ------------------------------------------------------------- */

static void write_cb(uv_write_t *req, int status)
{
    struct out_req *o = req->data;
    struct conn *c = o->c;
    c->out_bytes -= o->buf.len;
    proto_buf_free(&o->buf);
    free(o);
    if (status < 0 && status != UV_ECANCELED)
        log_debug("[conn %u] write failed: %s", c->id, uv_strerror(status));
    if (c->state == CONN_CLOSING && c->out_bytes == 0)
        conn_close(c);
}

/*
 * Takes pb's bytes and writes them; returns false (and frees) when it cannot.
 * A client whose unread replies would pass max_reply_bytes is disconnected:
 * it is not reading, and its acknowledgements would otherwise pile up here.
 */
static bool send_buf(struct conn *c, struct proto_buf *pb)
{
    if (uv_is_closing((uv_handle_t *)&c->pipe)) {
        proto_buf_free(pb);
        return false;
    }
    if (c->out_bytes + pb->len > c->srv->cfg->max_reply_bytes) {
        proto_buf_free(pb);
        set_state(c, CONN_CLOSING);
        stats.closed_slow_reader++;
        log_limited(LOG_WARN,
                    "[conn %u] pid %d uid %u does not read its replies (%zu bytes queued, "
                    "[agent] max_reply_bytes = %u); disconnecting",
                    c->id, (int)c->pid, (unsigned)c->uid, c->out_bytes,
                    c->srv->cfg->max_reply_bytes);
        conn_close(c);
        return false;
    }
    struct out_req *o = malloc(sizeof *o);
    if (o == NULL) {
        proto_buf_free(pb);
        return false;
    }
    o->c = c;
    o->buf = *pb;
    o->req.data = o;
    uv_buf_t b = uv_buf_init((char *)o->buf.data, (unsigned)o->buf.len);
    c->out_bytes += o->buf.len;
    if (uv_write(&o->req, (uv_stream_t *)&c->pipe, &b, 1, write_cb) != 0) {
        c->out_bytes -= o->buf.len;
        proto_buf_free(&o->buf);
        free(o);
        return false;
    }
    return true;
}

void conn_send_error(struct conn *c, uint64_t about_seq, uint32_t code, const char *message)
{
    struct proto_buf pb;
    proto_buf_init(&pb, 0);
    char text[1024];
    snprintf(text, sizeof text, "%s", message);
    log_scrub(text);
    struct proto_str m = {text, (uint32_t)strlen(text)};
    if (proto_encode_error(&pb, 0, about_seq, code, m) == 0 && send_buf(c, &pb)) {
        c->errors_sent++;
        stats.errors_to_clients++;
    } else {
        stats.errors_undeliverable++;
    }
}

void conn_send_flushed(struct conn *c, uint64_t flush_seq)
{
    if (c->flushes_waiting > 0)
        c->flushes_waiting--;
    struct proto_buf pb;
    proto_buf_init(&pb, 0);
    if (proto_encode_flushed(&pb, 0, flush_seq, c->errors_sent) != 0 || !send_buf(c, &pb))
        log_limited(LOG_WARN, "[conn %u] cannot queue the flushed reply (client not reading)",
                    c->id);
}

/*
 * Acknowledges every frame accepted so far, once per read. The session table learns the
 * same position, so a reconnecting client's resent frames are recognised.
 */
static void send_ack(struct conn *c)
{
    /* Clients that name no session predate acknowledgements and would not parse them. */
    if (c->session == 0 || c->last_seq <= c->acked_seq)
        return;
    /* Acknowledged means journaled: wait until the journal holds this connection's frames. */
    if (c->srv->journal && c->last_lsn > c->srv->durable_lsn)
        return;
    struct proto_buf pb;
    proto_buf_init(&pb, 0);
    if (proto_encode_ack(&pb, 0, c->last_seq) == 0 && send_buf(c, &pb))
        c->acked_seq = c->last_seq;
}

static void send_stats(struct conn *c, uint64_t seq)
{
    size_t n = stats_count();
    uint64_t values[128];
    if (n > sizeof values / sizeof values[0])
        n = sizeof values / sizeof values[0];
    stats_values(values);
    struct proto_buf pb;
    proto_buf_init(&pb, 0);
    if (proto_encode_stats_reply(&pb, seq, stats_names(), values, n) == 0)
        send_buf(c, &pb);
}

/* Reports a protocol violation and closes once the report is written. */
static void protocol_error(struct conn *c, uint64_t seq, const char *what)
{
    stats.rejected_protocol++;
    log_limited(LOG_WARN, "[conn %u] pid %d uid %u: %s; closing", c->id, (int)c->pid,
                (unsigned)c->uid, what);
    conn_send_error(c, seq, PROTO_ERR_PROTOCOL, what);
    uv_read_stop((uv_stream_t *)&c->pipe);
    c->reading = false;
    set_state(c, CONN_CLOSING);
    if (c->out_bytes == 0)
        conn_close(c);
}

/* ---- reading ------------------------------------------------------------- */

static void copy_str(char *dst, size_t cap, struct proto_str s)
{
    size_t n = s.len < cap - 1 ? s.len : cap - 1;
    memcpy(dst, s.ptr, n);
    dst[n] = '\0';
}

static void on_hello(struct conn *c, const struct proto_msg *m)
{
    copy_str(c->program, sizeof c->program, m->u.hello.program);
    copy_str(c->source_name, sizeof c->source_name, m->u.hello.source_name);
    copy_str(c->source_type, sizeof c->source_type, m->u.hello.source_type);
    c->context_tags = m->u.hello.context_tags;
    c->session = m->u.hello.session;
    c->last_seq = session_last_seq(&c->srv->sessions, c->session);
    log_info("[conn %u] hello from pid %u (%s), uid %u (%s), protocol %u", c->id, m->u.hello.pid,
             c->program, (unsigned)c->uid, c->user, m->u.hello.version);
    set_state(c, CONN_OPEN);
    c->greeted = true;
    if (!conn_may_read(c))
        stop_reading(c); /* a producer now, and the agent is paused */
    struct proto_buf pb;
    proto_buf_init(&pb, 0);
    struct proto_str v = {trackd_version, (uint32_t)strlen(trackd_version)};
    const char *uri = c->srv->cfg->backend_uri ? c->srv->cfg->backend_uri : "";
    if (proto_encode_welcome_uri(&pb, 0, v, c->srv->cfg->max_frame_bytes, c->id,
                                 (struct proto_str){uri, (uint32_t)strlen(uri)}) == 0)
        send_buf(c, &pb);
}

/*
 * The journal cannot take the frame: the connection is closed without acknowledging it, so
 * the client resends it after reconnecting, and every socket stays unread until the
 * database has caught up and committed segments are gone.
 */
static void journal_full(struct conn *c, int rc)
{
    stats.journal_full++;
    log_limited(LOG_WARN, "[conn %u] journal %s: pausing clients until committed segments free it",
                c->id, rc == -ENOSPC ? "at its quota" : strerror(-rc));
    c->srv->journal_full = true;
    apply_reading(c->srv);
    uv_read_stop((uv_stream_t *)&c->pipe);
    c->reading = false;
    set_state(c, CONN_CLOSING);
    if (c->out_bytes == 0)
        conn_close(c);
}

/* A frame handled without the journal (an artifact) is accepted like a journaled one. */
static void accept_seq(struct conn *c, uint64_t seq)
{
    if (seq > c->last_seq)
        c->last_seq = seq;
    session_note(&c->srv->sessions, c->session, seq, uv_now(c->srv->loop));
}

static const char *artifact_refusal(int rc)
{
    switch (rc) {
    case -ENOBUFS: return "too many artifacts pending in the agent";
    case -EDQUOT:
        return "this user already has " XSTR(
            UPLOADER_MAX_LIVE_PER_UID) " artifacts waiting for upload (the agent's limit per "
                                       "uid); wait for a flush and "
                                       "log it again";
    default: return proto_strerror(rc);
    }
}

/*
 * ARTIFACT: the descriptor that came with the frame is copied into the spool before the
 * frame is accepted; frames after it wait, so their order and acknowledgements hold.
 */
static void on_artifact(struct conn *c, const struct proto_msg *m)
{
    if (c->nfds == 0) {
        protocol_error(c, m->seq,
                       "artifact frame without a file descriptor (pass it with SCM_RIGHTS on "
                       "the frame's first byte)");
        return;
    }
    int fd = c->fds[0];
    memmove(c->fds, c->fds + 1, --c->nfds * sizeof c->fds[0]);
    if (c->session && m->seq <= c->last_seq) {
        close(fd);
        stats.duplicates_dropped++;
        return;
    }
    const struct proto_str path = m->u.artifact.path;
    const char *problem = uploader_path_problem(path.ptr, path.len);
    if (c->srv->uploader == NULL)
        problem = "this agent does not take artifacts";
    if (problem == NULL &&
        (m->u.artifact.run_id.len != PROTO_RUN_ID_LEN || memchr(path.ptr, '\0', path.len) != NULL))
        problem = "bad run id or path";
    struct artifact *a = NULL;
    int rc = problem ? -EINVAL
                     : uploader_snapshot(
                           c->srv->uploader,
                           &(struct artifact_origin){c->id, c->session, m->seq, &c->peer, c->user},
                           m->u.artifact.run_id.ptr, path, &m->u.artifact.seen, fd, &a);
    if (problem)
        close(fd);
    if (rc == -EEXIST) {
        /* Resent after an agent restart: the spool already holds it. */
        stats.duplicates_dropped++;
        accept_seq(c, m->seq);
        return;
    }
    if (rc != 0) {
        char msg[300];
        snprintf(msg, sizeof msg, "artifact '%.*s' not taken: %s",
                 (int)(path.len > 200 ? 200 : path.len), path.ptr,
                 problem ? problem : artifact_refusal(rc));
        stats.artifacts_failed++;
        conn_send_error(c, m->seq, PROTO_ERR_ARTIFACT, msg);
        accept_seq(c, m->seq);
        return;
    }
    c->snapshotting = true;
    stop_reading(c);
}

static void dispatch(struct conn *c, const struct proto_header *h, const uint8_t *body)
{
    struct proto_msg m;
    int rc = proto_msg_decode(h, body, &m);
    if (rc != 0) {
        char what[160];
        snprintf(what, sizeof what, "bad %s frame %llu: %s", proto_kind_name(h->kind),
                 (unsigned long long)h->seq, proto_strerror(rc));
        protocol_error(c, h->seq, what);
        return;
    }
    if (m.kind == PROTO_STATS) {
        send_stats(c, m.seq);
        return;
    }
    if (c->state == CONN_HELLO) {
        if (m.kind != PROTO_HELLO)
            protocol_error(c, h->seq, "the first frame must be hello");
        else
            on_hello(c, &m);
        return;
    }
    switch (m.kind) {
    case PROTO_HELLO: protocol_error(c, h->seq, "hello sent twice"); return;
    case PROTO_FLUSH:
        if (m.seq > c->last_seq)
            c->last_seq = m.seq;
        /* One client's flood of barriers must not use up the agent-wide bound for others. */
        if (c->flushes_waiting >= CONN_MAX_FLUSHES) {
            char msg[160];
            snprintf(msg, sizeof msg,
                     "too many flush requests outstanding on this connection (%u): wait for "
                     "the answers before sending more",
                     CONN_MAX_FLUSHES);
            stats.flushes_refused++;
            conn_send_error(c, m.seq, PROTO_ERR_PROTOCOL, msg);
            return;
        }
        /* Always answered, even when resent: the barrier is idempotent. */
        c->flushes_waiting++;
        if (ingest_flush(c->srv->ingest, c->id, m.seq) != 0)
            c->flushes_waiting--;
        return;
    case PROTO_ARTIFACT: on_artifact(c, &m); return;
    case PROTO_WELCOME:
    case PROTO_FLUSHED:
    case PROTO_ERROR:
    case PROTO_STATS_REPLY:
    case PROTO_ACK:
        protocol_error(c, h->seq, "message kind is sent by the agent, not by clients");
        return;
    default: {
        if (c->session && m.seq <= c->last_seq) {
            /* Resent after a reconnect, and already accepted: acknowledge, do not ingest. */
            stats.duplicates_dropped++;
            return;
        }
        struct events_origin o = {c->id,           c->user, c->source_name, c->source_type,
                                  c->context_tags, 0,       &c->peer};
        /* The writer is chosen first and journaled with the frame: a replay uses it again. */
        unsigned writer = ingest_route(c->srv->ingest, &m, INGEST_ROUTE_NEW);
        if (c->srv->journal) {
            unsigned writers = c->srv->ingest->nparts;
            struct frame_origin fo = {c->session,
                                      c->context_tags,
                                      c->user,
                                      c->source_name,
                                      c->source_type,
                                      &c->peer,
                                      (uint8_t)(writers > 1 ? writers : 0),
                                      (uint8_t)writer};
            int jrc = journaler_append(c->srv->journal, &fo, h, body, &o.lsn);
            if (jrc != 0) {
                journal_full(c, jrc);
                return;
            }
            c->last_lsn = o.lsn;
        }
        ingest_message(c->srv->ingest, &o, &m, writer);
        if (c->srv->uploader)
            spool_pace_events(&c->srv->uploader->spool);
        c->last_seq = m.seq;
        /* At once, not at the ack: a reconnect may come before the journal write does. */
        session_note(&c->srv->sessions, c->session, m.seq, uv_now(c->srv->loop));
        return;
    }
    }
}

static void process_frames(struct conn *c);

static void free_handle_cb(uv_handle_t *h)
{
    free(h);
}

/*
 * Takes the next descriptor the client passed. libuv queues received descriptors on the
 * pipe and hands them out through uv_accept into a handle; a throwaway pipe handle takes
 * it, and a duplicate survives the handle's close.
 */
static int take_fd(struct conn *c)
{
    uv_pipe_t *tmp = malloc(sizeof *tmp);
    if (tmp == NULL || uv_pipe_init(c->srv->loop, tmp, 0) != 0) {
        free(tmp);
        return -ENOMEM;
    }
    int fd = -1;
    uv_os_fd_t raw;
    if (uv_accept((uv_stream_t *)&c->pipe, (uv_stream_t *)tmp) == 0 &&
        uv_fileno((uv_handle_t *)tmp, &raw) == 0)
        fd = fcntl(raw, F_DUPFD_CLOEXEC, 3);
    uv_close((uv_handle_t *)tmp, free_handle_cb);
    return fd;
}

void conn_artifact_taken(struct conn *c, uint64_t seq, int rc, const char *msg)
{
    if (rc != 0 && rc != -EEXIST) /* -EEXIST: resent after a restart, already held */
        conn_send_error(c, seq, PROTO_ERR_ARTIFACT, msg);
    accept_seq(c, seq);
    c->snapshotting = false;
    if (c->state == CONN_CLOSING)
        return;
    process_frames(c);
    if (c->state != CONN_CLOSING && conn_may_read(c))
        start_reading(c);
}

/* Brings the server's read_bytes in line with this connection's reader capacity. */
static void count_reader(struct conn *c)
{
    struct conn_server *s = c->srv;
    s->read_bytes = s->read_bytes - c->read_cap + c->reader.cap;
    c->read_cap = c->reader.cap;
    stats.read_buffer_bytes = s->read_bytes;
}

/* Gives an empty reader's buffer back (after a large frame, or when idle). */
static void release_reader(struct conn *c)
{
    if (c->reader.cap > 0 && proto_reader_pending(&c->reader) == 0) {
        proto_reader_free(&c->reader);
        count_reader(c);
    }
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct conn *c = h->data;
    uint8_t *p;
    size_t n;
    (void)suggested;
    if (proto_reader_space(&c->reader, READ_CHUNK, &p, &n) != 0) {
        buf->base = NULL;
        buf->len = 0;
        return;
    }
    count_reader(c);
    buf->base = (char *)p;
    buf->len = n;
}

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = s->data;
    (void)buf;
    if (nread < 0) {
        if (nread != UV_EOF)
            log_debug("[conn %u] read error: %s", c->id, uv_strerror((int)nread));
        else if (proto_reader_pending(&c->reader) > 0) {
            stats.closed_mid_frame++;
            log_limited(LOG_WARN,
                        "[conn %u] closed mid-frame (%zu bytes of a partial frame dropped)", c->id,
                        proto_reader_pending(&c->reader));
        }
        conn_close(c);
        return;
    }
    if (nread == 0)
        return;
    if (buf->base == NULL) {
        protocol_error(c, 0, "out of memory for the frame");
        return;
    }
    proto_reader_commit(&c->reader, (size_t)nread);
    stats.bytes_received += (uint64_t)nread;
    while (uv_pipe_pending_count(&c->pipe) > 0) {
        int fd = take_fd(c);
        if (fd < 0 || c->nfds == sizeof c->fds / sizeof c->fds[0]) {
            if (fd >= 0)
                close(fd);
            protocol_error(c, 0, "too many file descriptors sent ahead of their frames");
            return;
        }
        c->fds[c->nfds++] = fd;
    }
    process_frames(c);
    if (c->state == CONN_CLOSING || uv_is_closing((uv_handle_t *)&c->pipe))
        return;
    if (proto_reader_pending(&c->reader) == 0) {
        c->partial_since_ms = 0;
        /* A busy client keeps one chunk between frames; a client that only said hello may
         * stay quiet for long (a thousand such hold 64 MiB of the read budget otherwise). */
        if (c->reader.cap > READ_CHUNK || c->greeted)
            release_reader(c);
        c->greeted = false;
    } else if (c->partial_since_ms == 0) {
        c->partial_since_ms = uv_now(c->srv->loop);
    }
    if (c->srv->read_bytes > c->srv->cfg->max_read_buffer_bytes)
        shed_reader_memory(c->srv);
}

/* Reader memory of one uid's connections that hold an incomplete frame. */
struct uid_bytes {
    uid_t uid;
    size_t bytes;
};

static int cmp_uid_bytes(const void *a, const void *b)
{
    uid_t x = ((const struct uid_bytes *)a)->uid, y = ((const struct uid_bytes *)b)->uid;
    return x < y ? -1 : x > y;
}

/*
 * The uid whose incomplete frames hold the most reader memory; false when no connection holds
 * one (or out of memory: then every uid counts as one).
 */
static bool heaviest_uid(const struct conn_server *s, uid_t *out)
{
    struct uid_bytes *v = malloc(s->count * sizeof *v + 1);
    size_t n = 0;
    for (const struct conn *c = s->head; c; c = c->next)
        if (c->partial_since_ms && !c->snapshotting) {
            if (v == NULL) {
                *out = c->uid;
                return true;
            }
            v[n++] = (struct uid_bytes){c->uid, c->read_cap};
        }
    if (n > 1)
        qsort(v, n, sizeof *v, cmp_uid_bytes);
    size_t best = 0, i = 0;
    bool found = false;
    while (i < n) {
        size_t k = i, sum = 0;
        for (; k < n && v[k].uid == v[i].uid; k++)
            sum += v[k].bytes;
        if (!found || sum > best) {
            best = sum;
            *out = v[i].uid;
            found = true;
        }
        i = k;
    }
    free(v);
    return found;
}

/*
 * Over max_read_buffer_bytes: closes connections with incomplete frames until the budget
 * holds, each time the oldest of the uid that holds the most, so that one user's flood of
 * partial frames costs that user's connections and not another's. Complete frames are
 * dispatched as they arrive, so what is held here is partial frames; the oldest is the
 * likeliest to be a stalled or hostile sender.
 */
static void shed_reader_memory(struct conn_server *s)
{
    while (s->read_bytes > s->cfg->max_read_buffer_bytes) {
        uid_t uid = 0;
        if (!heaviest_uid(s, &uid))
            return;
        struct conn *oldest = NULL;
        for (struct conn *c = s->head; c; c = c->next)
            if (c->partial_since_ms && !c->snapshotting && c->uid == uid &&
                (!oldest || c->partial_since_ms < oldest->partial_since_ms ||
                 (c->partial_since_ms == oldest->partial_since_ms && c->id < oldest->id)))
                oldest = c; /* the loop's clock counts milliseconds: ties go to the older */
        if (oldest == NULL)
            return;
        stats.closed_read_memory++;
        log_limited(LOG_WARN,
                    "[conn %u] pid %d uid %u: incomplete frames over all clients hold %zu bytes "
                    "([agent] max_read_buffer_bytes = %llu), the most of them this uid's; "
                    "closing its oldest (%zu bytes)",
                    oldest->id, (int)oldest->pid, (unsigned)oldest->uid, s->read_bytes,
                    (unsigned long long)s->cfg->max_read_buffer_bytes,
                    proto_reader_pending(&oldest->reader));
        conn_send_error(
            oldest, 0, PROTO_ERR_PROTOCOL,
            "incomplete frame dropped: the agent's memory for incomplete frames is full");
        conn_close(oldest); /* frees its reader in close_cb; uncount it now */
    }
}

/*
 * Dispatches every whole frame buffered, unless an artifact snapshot holds
 * them back or the connection has used up this second's max_frames_per_sec:
 * then the rest waits, unread, for the sweep to open the next window.
 */
static void process_frames(struct conn *c)
{
    uint32_t max_rate = c->srv->cfg->max_frames_per_sec;
    while (!c->snapshotting && !c->rate_paused) {
        if (max_rate && c->frames_window >= max_rate) {
            c->rate_paused = true;
            stats.rate_limited++;
            log_limited(LOG_WARN,
                        "[conn %u] pid %d uid %u sent %u frames within a second ([agent] "
                        "max_frames_per_sec); reading it more slowly",
                        c->id, (int)c->pid, (unsigned)c->uid, c->frames_window);
            stop_reading(c);
            break;
        }
        struct proto_header h;
        const uint8_t *body;
        int rc = proto_reader_next(&c->reader, &h, &body);
        if (rc == 0)
            break;
        if (rc < 0) {
            char what[160];
            snprintf(what, sizeof what, "bad frame header: %s (limit %u bytes)", proto_strerror(rc),
                     c->srv->cfg->max_frame_bytes);
            protocol_error(c, 0, what);
            return;
        }
        stats.frames_received++;
        c->last_frame_ms = uv_now(c->srv->loop);
        c->frames_window++;
        dispatch(c, &h, body);
        if (c->state == CONN_CLOSING)
            return;
    }
    if (proto_reader_pending(&c->reader) == 0)
        c->partial_since_ms = 0; /* frames held back by a snapshot or the rate limit are done */
    if (c->srv->journal)
        journaler_kick(c->srv->journal);
    send_ack(c);
}

static void start_reading(struct conn *c)
{
    if (!c->reading && c->state != CONN_CLOSING && !uv_is_closing((uv_handle_t *)&c->pipe)) {
        if (uv_read_start((uv_stream_t *)&c->pipe, alloc_cb, read_cb) == 0) {
            c->reading = true;
            /* Time spent paused by the agent does not count against the client. */
            if (c->partial_since_ms)
                c->partial_since_ms = uv_now(c->srv->loop);
        }
    }
}

static void stop_reading(struct conn *c)
{
    if (c->reading) {
        uv_read_stop((uv_stream_t *)&c->pipe);
        c->reading = false;
    }
}

/* Reads happen only while neither memory nor the journal is full and no shutdown runs. */
static bool may_read(const struct conn_server *s)
{
    return !s->paused && !s->journal_full && !s->journal_stalled && !s->draining;
}

/*
 * A connection waiting for its uid's user name is not read at all. One that has not said
 * hello yet is read even while paused: it can only be a hello or a stats request, and
 * `trackd stats` must answer most when the agent is busiest.
 */
static bool conn_may_read(const struct conn *c)
{
    if (c->state == CONN_RESOLVING || c->snapshotting || c->rate_paused)
        return false;
    return may_read(c->srv) || (c->state == CONN_HELLO && !c->srv->draining);
}

static void apply_reading(struct conn_server *s)
{
    for (struct conn *c = s->head; c; c = c->next) {
        if (conn_may_read(c))
            start_reading(c);
        else
            stop_reading(c);
    }
}

void conn_pause_all(struct conn_server *s, bool pause)
{
    s->paused = pause;
    apply_reading(s);
}

void conn_drain_all(struct conn_server *s)
{
    s->draining = true;
    for (struct conn *c = s->head; c; c = c->next)
        stop_reading(c);
}

/* ---- lifecycle ------------------------------------------------------------- */

static void close_cb(uv_handle_t *h)
{
    struct conn *c = h->data;
    for (size_t i = 0; i < c->nfds; i++)
        close(c->fds[i]);
    proto_reader_free(&c->reader);
    free(c);
}

static void conn_close(struct conn *c)
{
    if (uv_is_closing((uv_handle_t *)&c->pipe))
        return;
    struct conn_server *s = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->count--;
    stats.connections_current = s->count;
    s->read_bytes -= c->read_cap;
    c->read_cap = 0;
    stats.read_buffer_bytes = s->read_bytes;
    ingest_forget_conn(s->ingest, c->id);
    if (c->state == CONN_RESOLVING)
        users_cancel(&s->users, &c->user_wait);
    log_debug("[conn %u] closed", c->id);
    uv_close((uv_handle_t *)&c->pipe, close_cb);
}

void conn_journal_durable(struct conn_server *s, uint64_t lsn)
{
    s->durable_lsn = lsn;
    for (struct conn *c = s->head; c; c = c->next)
        send_ack(c);
}

void conn_journal_room(struct conn_server *s)
{
    if (!s->journal_full)
        return;
    s->journal_full = false;
    log_info("[conn] the journal has room again: resuming clients");
    apply_reading(s);
}

void conn_journal_stalled(struct conn_server *s, bool stalled)
{
    s->journal_stalled = stalled;
    apply_reading(s);
}

void conn_close_all(struct conn_server *s)
{
    users_close(&s->users);
    while (s->head)
        conn_close(s->head);
    if (!uv_is_closing((uv_handle_t *)&s->sweep))
        uv_close((uv_handle_t *)&s->sweep, NULL);
}

/* Closes c for a limit: an error frame where the client can still read one, then the socket. */
static void limit_close(struct conn *c, uint64_t *counter, const char *why)
{
    (*counter)++;
    conn_send_error(c, 0, PROTO_ERR_PROTOCOL, why);
    stop_reading(c);
    set_state(c, CONN_CLOSING);
    if (c->out_bytes == 0)
        conn_close(c);
}

/* One rate-limited log line per cause (log_limited keeps its state per call site). */
#define LIMIT_LOG(c, why)                                                                          \
    log_limited(LOG_WARN, "[conn %u] pid %d uid %u: %s; closing", (c)->id, (int)(c)->pid,          \
                (unsigned)(c)->uid, (why))

/*
 * Every SWEEP_MS: the hello, frame and idle timeouts, the end of each rate
 * window, and the buffers of readers that have nothing in them.
 */
static void conn_sweep(uv_timer_t *t)
{
    struct conn_server *s = t->data;
    const struct trackd_config *cfg = s->cfg;
    uint64_t now = uv_now(s->loop);
    bool new_window = now - s->window_start_ms >= RATE_WINDOW_MS;
    if (new_window)
        s->window_start_ms = now;
    char why[160];
    for (struct conn *c = s->head, *next; c; c = next) {
        next = c->next;
        if (c->state == CONN_CLOSING)
            continue;
        if (new_window) {
            c->frames_window = 0;
            if (c->rate_paused) {
                c->rate_paused = false;
                process_frames(c); /* what was held back; may pause again */
                if (c->state == CONN_CLOSING || uv_is_closing((uv_handle_t *)&c->pipe))
                    continue;
                if (conn_may_read(c))
                    start_reading(c);
            }
        }
        if (c->state == CONN_HELLO && now - c->accepted_ms >= cfg->hello_timeout_ms) {
            snprintf(why, sizeof why, "no hello within %u ms ([agent] hello_timeout_ms)",
                     cfg->hello_timeout_ms);
            LIMIT_LOG(c, why);
            limit_close(c, &stats.timeouts_hello, why);
        } else if (c->reading && !c->snapshotting && c->partial_since_ms &&
                   proto_reader_pending(&c->reader) > 0 &&
                   now - c->partial_since_ms >= cfg->frame_timeout_ms) {
            snprintf(why, sizeof why,
                     "a frame still incomplete after %u ms (%zu bytes; [agent] frame_timeout_ms)",
                     cfg->frame_timeout_ms, proto_reader_pending(&c->reader));
            LIMIT_LOG(c, why);
            limit_close(c, &stats.timeouts_frame, why);
        } else if (cfg->idle_timeout_ms && c->state == CONN_OPEN &&
                   now - (c->last_frame_ms ? c->last_frame_ms : c->accepted_ms) >=
                       cfg->idle_timeout_ms) {
            snprintf(why, sizeof why, "idle for %u ms ([agent] idle_timeout_ms)",
                     cfg->idle_timeout_ms);
            LIMIT_LOG(c, why);
            limit_close(c, &stats.timeouts_idle, why);
        } else if (c->partial_since_ms == 0 && now - c->last_frame_ms >= 1000) {
            release_reader(c); /* an idle client holds no buffer */
        }
    }
}

/* The user name of c's uid is known: the connection may say hello. */
static void user_known(struct conn *c, const char *name)
{
    snprintf(c->user, sizeof c->user, "%s", name);
    c->accepted_ms = c->last_frame_ms = uv_now(c->srv->loop); /* the hello timeout starts now */
    set_state(c, CONN_HELLO);
    if (conn_may_read(c))
        start_reading(c);
}

static void user_resolved(struct users_wait *w, const char *name)
{
    struct conn *c = (struct conn *)((char *)w - offsetof(struct conn, user_wait));
    user_known(c, name);
}

/*
 * The peer's groups as the kernel recorded them at connect: the primary gid first, then up to
 * PEER_GROUPS_MAX supplementary ones (SO_PEERGROUPS, Linux 4.13; without it, the primary
 * only). Returns how many are in groups. No NSS lookup: nothing here blocks.
 */
static size_t peer_groups(int fd, gid_t primary, gid_t *groups)
{
    groups[0] = primary;
    size_t n = 1;
#ifdef SO_PEERGROUPS
    socklen_t len = PEER_GROUPS_MAX * sizeof(gid_t);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups + 1, &len) == 0)
        n += len / sizeof(gid_t);
    else if (errno == ERANGE)
        log_limited(LOG_WARN,
                    "[conn] a peer of gid %u is in more than %d groups; only its primary group "
                    "counts for allowed_gids and shared_gids",
                    (unsigned)primary, PEER_GROUPS_MAX);
#else
    (void)fd;
#endif
    return n;
}

static void refuse_cb(uv_handle_t *h)
{
    free(h);
}

void conn_accept(struct conn_server *s, uv_stream_t *listener)
{
    if (s->count >= s->cfg->max_connections || s->draining) {
        uv_pipe_t *p = malloc(sizeof *p);
        if (p && uv_pipe_init(s->loop, p, 0) == 0) {
            uv_accept(listener, (uv_stream_t *)p);
            uv_close((uv_handle_t *)p, refuse_cb);
        } else {
            free(p);
        }
        stats.connections_rejected++;
        log_limited(LOG_WARN, "[listener] refused a connection: %s",
                    s->draining ? "shutting down" : "max_connections reached");
        return;
    }
    struct conn *c = calloc(1, sizeof *c);
    if (c == NULL)
        return;
    /* IPC mode: libuv then reads with recvmsg and keeps the descriptors clients pass. */
    if (uv_pipe_init(s->loop, &c->pipe, 1) != 0) {
        free(c);
        return;
    }
    c->pipe.data = c;
    c->srv = s;
    c->id = s->next_id++;
    if (s->next_id == 0)
        s->next_id = 1;
    proto_reader_init(&c->reader, s->cfg->max_frame_bytes);
    c->next = s->head;
    if (s->head)
        s->head->prev = c;
    s->head = c;
    s->count++;
    stats.connections_current = s->count;
    stats.connections_accepted++;
    if (uv_accept(listener, (uv_stream_t *)&c->pipe) != 0) {
        conn_close(c);
        return;
    }
    uv_os_fd_t fd;
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (uv_fileno((uv_handle_t *)&c->pipe, &fd) != 0 ||
        getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        log_warn("[conn %u] cannot read peer credentials; closing", c->id);
        conn_close(c);
        return;
    }
    c->uid = cred.uid;
    c->gid = cred.gid;
    c->pid = cred.pid;
    c->accepted_ms = c->last_frame_ms = uv_now(s->loop);
    size_t same_uid = 0;
    for (const struct conn *o = s->head; o; o = o->next)
        same_uid += o != c && o->uid == cred.uid;
    if (same_uid >= s->cfg->max_connections_per_uid) {
        stats.connections_rejected++;
        log_limited(LOG_WARN,
                    "[listener] refused a connection from pid %d uid %u: it has %zu already "
                    "([agent] max_connections_per_uid)",
                    (int)c->pid, (unsigned)c->uid, same_uid);
        conn_close(c);
        return;
    }
    gid_t groups[PEER_GROUPS_MAX + 1];
    size_t ngroups = peer_groups(fd, cred.gid, groups);
    if (!identity_allowed(&s->rules, cred.uid, groups, ngroups)) {
        stats.connections_refused_identity++;
        log_limited(LOG_WARN,
                    "[conn %u] refused pid %d uid %u gid %u: not in [agent] allowed_uids or "
                    "allowed_gids",
                    c->id, (int)c->pid, (unsigned)c->uid, (unsigned)c->gid);
        conn_close(c);
        return;
    }
    identity_peer(&s->rules, cred.uid, groups, ngroups, &c->peer);
    log_debug("[conn %u] accepted pid %d uid %u", c->id, (int)c->pid, (unsigned)c->uid);
    const char *name = users_find(&s->users, cred.uid);
    if (name != NULL) {
        user_known(c, name);
        return;
    }
    c->user_wait.uid = cred.uid;
    c->user_wait.cb = user_resolved;
    users_resolve(&s->users, &c->user_wait); /* CONN_RESOLVING until it answers */
}
