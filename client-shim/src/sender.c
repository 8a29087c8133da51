/*
 * libtrackd's sender thread: the only user of the socket. It lets events accumulate for
 * linger_ms, swaps `pending` out, writes it (each ARTIFACT frame with its file's descriptor
 * as SCM_RIGHTS) and reads the agent's welcome, acks, flushed and error frames. Sent frames
 * stay in `unacked` until the agent acknowledges them and go again after a reconnect.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "shim_internal.h"
#include "util.h"

#define RECONNECT_MIN_MS 50
#define RECONNECT_MAX_MS 2000
/*
 * After sending, the sender keeps looking for new events every linger_ms for
 * this long before it sleeps until woken: a training loop that logs every few
 * milliseconds then never pays for a wake-up system call in its logging calls.
 */
#define WARM_IDLE_MS 1000
#define CLOSE_SEND_MS 2000

static void disconnect(struct trackd_client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->state = IO_DISCONNECTED;
    proto_reader_free(&c->reader);
    pthread_mutex_lock(&c->mu);
    c->ctr.connected = 0;
    pthread_mutex_unlock(&c->mu);
}

static void handle_frame(struct trackd_client *c, const struct proto_header *h, const uint8_t *body)
{
    struct proto_msg m;
    if (proto_msg_decode(h, body, &m) != 0)
        return;
    pthread_mutex_lock(&c->mu);
    if (m.kind == PROTO_WELCOME) {
        if (m.u.welcome.max_frame >= 4096)
            c->max_frame = m.u.welcome.max_frame;
        snprintf(c->backend_uri, sizeof c->backend_uri, "%.*s", (int)m.u.welcome.backend_uri.len,
                 m.u.welcome.backend_uri.ptr);
        c->welcomed = true;
        pthread_cond_broadcast(&c->cv);
    } else if (m.kind == PROTO_ACK) {
        if (m.u.ack.acked_seq > c->agent_acked)
            c->agent_acked = m.u.ack.acked_seq;
    } else if (m.kind == PROTO_FLUSHED) {
        if (m.u.flushed.flush_seq > c->flushed)
            c->flushed = m.u.flushed.flush_seq;
        pthread_cond_broadcast(&c->cv);
    } else if (m.kind == PROTO_ERROR) {
        c->ctr.errors++;
        if (c->err_count == ERROR_QUEUE) {
            c->ctr.errors_lost++;
        } else {
            struct trackd_error *e = &c->errs[(c->err_head + c->err_count++) % ERROR_QUEUE];
            e->seq = m.u.error.about_seq;
            e->code = m.u.error.code;
            snprintf(e->message, sizeof e->message, "%.*s", (int)m.u.error.message.len,
                     m.u.error.message.ptr);
        }
    }
    pthread_mutex_unlock(&c->mu);
}

/* Reads what the agent sent; -1 when the connection is gone. */
static int read_input(struct trackd_client *c)
{
    for (;;) {
        uint8_t *p;
        size_t n;
        if (proto_reader_space(&c->reader, 65536, &p, &n) != 0)
            return -1;
        ssize_t got = read(c->fd, p, n);
        if (got == 0)
            return -1;
        if (got < 0)
            return errno == EAGAIN || errno == EINTR ? 0 : -1;
        proto_reader_commit(&c->reader, (size_t)got);
        struct proto_header h;
        const uint8_t *body;
        int rc;
        while ((rc = proto_reader_next(&c->reader, &h, &body)) == 1)
            handle_frame(c, &h, body);
        if (rc < 0)
            return -1;
    }
}

static void drain_wake(struct trackd_client *c)
{
    uint64_t v;
    ssize_t r = read(c->wake_fd, &v, sizeof v);
    (void)r;
}

/* Waits up to ms for the agent or a producer; reads replies. -1: connection lost. */
static int wait_events(struct trackd_client *c, int ms)
{
    struct pollfd p[2] = {{c->wake_fd, POLLIN, 0}, {c->fd, POLLIN, 0}};
    int n = poll(p, c->fd >= 0 ? 2 : 1, ms);
    if (n <= 0)
        return 0;
    if (p[0].revents & POLLIN)
        drain_wake(c);
    if (c->fd >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR)))
        return read_input(c);
    return 0;
}

/* Sends with pass_fd (>= 0) attached as SCM_RIGHTS to the first byte sent. */
static ssize_t send_fd(int sock, const uint8_t *buf, size_t len, int pass_fd)
{
    if (pass_fd < 0)
        return send(sock, buf, len, MSG_NOSIGNAL);
    union {
        char b[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct iovec iov = {(void *)buf, len};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.b;
    msg.msg_controllen = sizeof u.b;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &pass_fd, sizeof pass_fd);
    return sendmsg(sock, &msg, MSG_NOSIGNAL);
}

/*
 * Writes all of buf, reading replies meanwhile; gives up after limit_ms (< 0: never).
 * pass_fd (>= 0) travels with the first byte.
 */
static int write_all_fd(struct trackd_client *c, const uint8_t *buf, size_t len, int pass_fd,
                        int limit_ms)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    size_t off = 0;
    while (off < len) {
        ssize_t n = send_fd(c->fd, buf + off, len - off, off == 0 ? pass_fd : -1);
        if (n > 0) {
            off += (size_t)n;
            continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            return -1;
        struct pollfd p = {c->fd, POLLOUT | POLLIN, 0};
        poll(&p, 1, 100);
        if ((p.revents & POLLIN) && read_input(c) != 0)
            return -1;
        if (p.revents & (POLLERR | POLLHUP))
            return -1;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (limit_ms < 0) {
            /* A close while the agent is not reading must not wait for it forever. */
            pthread_mutex_lock(&c->mu);
            bool stopping = c->stop;
            pthread_mutex_unlock(&c->mu);
            if (stopping) {
                start = now;
                limit_ms = CLOSE_SEND_MS;
            }
        }
        if (limit_ms >= 0 &&
            (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000 > limit_ms)
            return -1;
    }
    return 0;
}

static int write_all(struct trackd_client *c, const uint8_t *buf, size_t len, int limit_ms)
{
    return write_all_fd(c, buf, len, -1, limit_ms);
}

static int fd_for_seq(struct trackd_client *c, uint64_t seq)
{
    int fd = -1;
    pthread_mutex_lock(&c->mu);
    for (size_t i = 0; i < c->nfds && fd < 0; i++)
        if (c->fds[i].seq == seq)
            fd = c->fds[i].fd;
    pthread_mutex_unlock(&c->mu);
    return fd;
}

/* Writes whole frames; each ARTIFACT frame goes with its file's descriptor. */
static int send_frames(struct trackd_client *c, const uint8_t *buf, size_t len, int limit_ms)
{
    size_t off = 0, start = 0;
    struct proto_header h;
    while (len - off >= PROTO_HEADER_LEN &&
           proto_header_decode(buf + off, PROTO_MAX_BODY_HARD, &h) == 0) {
        size_t flen = PROTO_HEADER_LEN + (size_t)h.body_len;
        if (h.kind == PROTO_ARTIFACT) {
            if (start < off && write_all(c, buf + start, off - start, limit_ms) != 0)
                return -1;
            if (write_all_fd(c, buf + off, flen, fd_for_seq(c, h.seq), limit_ms) != 0)
                return -1;
            start = off + flen;
        }
        off += flen;
    }
    return start < len ? write_all(c, buf + start, len - start, limit_ms) : 0;
}

/* Closes the files of acknowledged ARTIFACT frames (all of them: acked = UINT64_MAX). */
void shim_release_fds(struct trackd_client *c, uint64_t acked)
{
    size_t k = 0;
    for (size_t i = 0; i < c->nfds; i++) {
        if (c->fds[i].seq <= acked)
            close(c->fds[i].fd);
        else
            c->fds[k++] = c->fds[i];
    }
    c->nfds = k;
}

/* Connects and says hello; re-sends a barrier lost with the previous connection. */
static int try_connect(struct trackd_client *c)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, c->socket_path, sizeof sa.sun_path);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    c->fd = fd;
    proto_reader_init(&c->reader, PROTO_MAX_BODY_HARD);
    struct proto_buf hello;
    proto_buf_init(&hello, 0);
    pthread_mutex_lock(&c->mu);
    uint64_t seq = c->next_seq++;
    pthread_mutex_unlock(&c->mu);
    int rc = proto_encode_hello_ctx(&hello, seq, (uint32_t)getpid(), to_str(c->program),
                                    to_str(c->source_name), to_str(c->source_type),
                                    to_str("libtrackd " TRACKD_VERSION), !c->no_context_tags,
                                    c->session);
    if (rc == 0)
        rc = write_all(c, hello.data, hello.len, 1000);
    proto_buf_free(&hello);
    /*
     * Frames the previous agent connection never acknowledged go again, before anything
     * newer; the agent recognises the session and drops the ones it already has.
     */
    if (rc == 0 && c->unacked.len > 0)
        rc = send_frames(c, c->unacked.data, c->unacked.len, -1);
    /*
     * A barrier the old agent acknowledged but never answered would wait forever: ask again
     * with the same seq, after everything resent. Only then: a flush frame still waiting in
     * pending or unacked goes out in its place, behind the events it is a barrier for.
     */
    pthread_mutex_lock(&c->mu);
    uint64_t wanted =
        c->flush_wanted > c->flushed && c->agent_acked >= c->flush_wanted ? c->flush_wanted : 0;
    pthread_mutex_unlock(&c->mu);
    if (rc == 0 && wanted) {
        struct proto_buf again;
        proto_buf_init(&again, 0);
        rc = proto_encode_empty(&again, wanted, PROTO_FLUSH);
        if (rc == 0)
            rc = write_all(c, again.data, again.len, 1000);
        proto_buf_free(&again);
    }
    if (rc != 0) {
        disconnect(c);
        return -1;
    }
    c->state = IO_CONNECTED;
    pthread_mutex_lock(&c->mu);
    c->ctr.connected = 1;
    if (c->ever_connected)
        c->ctr.reconnects++;
    pthread_mutex_unlock(&c->mu);
    c->ever_connected = true;
    c->reconnect_failures = 0;
    return 0;
}

/*
 * Drops the frames the agent acknowledged from the front of unacked (frames are in seq
 * order there) and frees their share of the buffer bound. Sender thread, mu held.
 */
static void trim_unacked(struct trackd_client *c)
{
    size_t off = 0;
    while (c->unacked.len - off >= PROTO_HEADER_LEN) {
        struct proto_header h;
        if (proto_header_decode(c->unacked.data + off, PROTO_MAX_BODY_HARD, &h) != 0 ||
            h.seq > c->agent_acked)
            break;
        off += PROTO_HEADER_LEN + h.body_len;
    }
    if (c->nfds)
        shim_release_fds(c, c->agent_acked);
    if (off > 0) {
        proto_buf_consume(&c->unacked, off);
        if (c->unacked.len == 0)
            c->unacked_events = 0;
        pthread_cond_broadcast(&c->cv);
    }
    c->unacked_bytes = c->unacked.len;
}

void *shim_sender_main(void *arg)
{
    struct trackd_client *c = arg;
    bool lingered = false; /* the pending events already waited linger_ms */
    pthread_mutex_lock(&c->mu);
    for (;;) {
        trim_unacked(c);
        bool stopping = c->stop;
        if (c->state == IO_DISCONNECTED) {
            if (stopping)
                break;
            pthread_mutex_unlock(&c->mu);
            if (try_connect(c) != 0) {
                /* Jittered: the ranks of a job that lost the agent together do not all
                 * come back in the same millisecond. */
                wait_events(c, (int)util_backoff_ms(++c->reconnect_failures, RECONNECT_MIN_MS,
                                                    RECONNECT_MAX_MS,
                                                    (uint32_t)rand_r(&c->backoff_seed)));
            }
            pthread_mutex_lock(&c->mu);
            continue;
        }
        if (c->pending.len == 0) {
            if (stopping)
                break;
            /* Warm: producers do not wake us; we look again after linger_ms. */
            bool warm = util_clock_ms(CLOCK_MONOTONIC) - c->last_send_ms < WARM_IDLE_MS;
            c->io_idle = !warm;
            pthread_mutex_unlock(&c->mu);
            int rc = wait_events(c, warm ? c->linger_ms : -1);
            pthread_mutex_lock(&c->mu);
            c->io_idle = false;
            if (rc != 0) {
                pthread_mutex_unlock(&c->mu);
                disconnect(c);
                pthread_mutex_lock(&c->mu);
            }
            lingered = warm;
            continue;
        }
        bool urgent = stopping || c->flush_wanted > c->flushed || c->pending.len >= SEND_THRESHOLD;
        if (!urgent && !lingered) {
            /* Let a burst accumulate into one write. */
            pthread_mutex_unlock(&c->mu);
            int rc = wait_events(c, c->linger_ms);
            pthread_mutex_lock(&c->mu);
            if (rc != 0) {
                pthread_mutex_unlock(&c->mu);
                disconnect(c);
                pthread_mutex_lock(&c->mu);
                continue;
            }
        }
        lingered = false;
        c->last_send_ms = util_clock_ms(CLOCK_MONOTONIC);
        struct proto_buf tmp = c->sendbuf;
        c->sendbuf = c->pending;
        c->pending = tmp;
        c->pending.len = 0;
        uint64_t events = c->pending_events;

        c->pending_events = 0;
        c->threshold_woken = false;
        c->metrics_open = false;
        pthread_cond_broadcast(&c->cv);
        pthread_mutex_unlock(&c->mu);

        int rc = send_frames(c, c->sendbuf.data, c->sendbuf.len, stopping ? CLOSE_SEND_MS : -1);
        /* Sent or not, the frames wait in unacked until the agent confirms them. */
        int keep = proto_buf_reserve(&c->unacked, c->sendbuf.len);
        if (keep == 0) {
            memcpy(c->unacked.data + c->unacked.len, c->sendbuf.data, c->sendbuf.len);
            c->unacked.len += c->sendbuf.len;
            c->unacked_events += events;
        }
        c->sendbuf.len = 0;
        pthread_mutex_lock(&c->mu);
        if (keep != 0)
            c->ctr.lost += events;
        if (rc == 0)
            c->ctr.sent += events;
        trim_unacked(c);
        if (rc != 0) {
            pthread_mutex_unlock(&c->mu);
            disconnect(c);
            pthread_mutex_lock(&c->mu);
        }
    }
    /* Whatever could not be sent, or was never acknowledged, is lost: count it. */
    c->ctr.lost += c->pending_events + (c->unacked.len ? c->unacked_events : 0);
    c->pending_events = 0;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return NULL;
}
