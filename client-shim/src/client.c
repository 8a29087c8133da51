/*
 * libtrackd's trackd_open() and trackd_close(), and the registry of open clients that the fork
 * handlers walk: in a forked child each client is marked unusable (its calls return -ECHILD)
 * and the child's copies of the parent's sockets are closed.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "shim_internal.h"
#include "util.h"

#define DEFAULT_BUFFER (16u * 1024u * 1024u)
#define DEFAULT_MAX_FRAME (1024u * 1024u) /* until the agent's welcome says otherwise */

/* Every open client, so that a forked child can let go of the parent's sockets. */
static pthread_mutex_t clients_mu = PTHREAD_MUTEX_INITIALIZER;
static trackd_client *clients;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void atfork_prepare(void)
{
    pthread_mutex_lock(&clients_mu);
}

static void atfork_parent(void)
{
    pthread_mutex_unlock(&clients_mu);
}

/*
 * In the child only the forking thread exists: the sender threads are gone and the sockets
 * are the parent's. Closing the child's copies lets the agent see the parent's connection
 * end when the parent does, and marks each client unusable here.
 */
static void atfork_child(void)
{
    for (trackd_client *c = clients; c; c = c->next) {
        c->forked = true;
        if (c->fd >= 0)
            close(c->fd);
        if (c->wake_fd >= 0)
            close(c->wake_fd);
        c->fd = c->wake_fd = -1;
    }
    pthread_mutex_unlock(&clients_mu);
}

static void atfork_register(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

static void registry_add(trackd_client *c)
{
    pthread_once(&atfork_once, atfork_register);
    pthread_mutex_lock(&clients_mu);
    c->next = clients;
    clients = c;
    pthread_mutex_unlock(&clients_mu);
}

static void registry_remove(trackd_client *c)
{
    pthread_mutex_lock(&clients_mu);
    for (trackd_client **p = &clients; *p; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            break;
        }
    }
    pthread_mutex_unlock(&clients_mu);
}

static void read_argv0(char *out, size_t n)
{
    out[0] = '\0';
    int fd = open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t got = read(fd, out, n - 1);
    close(fd);
    out[got > 0 ? (size_t)got : 0] = '\0';
}

int trackd_open(trackd_client **out, const struct trackd_options *opts)
{
    struct trackd_options o = {0};
    if (out == NULL)
        return -EINVAL;
    if (opts)
        o = *opts;
    const char *path = o.socket_path ? o.socket_path : getenv("TRACKD_SOCKET");
    if (path == NULL || path[0] == '\0')
        path = TRACKD_DEFAULT_SOCKET;
    struct trackd_client *c = calloc(1, sizeof *c);
    if (c == NULL)
        return -ENOMEM;
    if (strlen(path) >= sizeof c->socket_path) {
        free(c);
        return -ENAMETOOLONG;
    }
    snprintf(c->socket_path, sizeof c->socket_path, "%s", path);
    read_argv0(c->program, sizeof c->program);
    snprintf(c->source_name, sizeof c->source_name, "%s",
             o.source_name ? o.source_name : c->program);
    snprintf(c->source_type, sizeof c->source_type, "%s", o.source_type ? o.source_type : "LOCAL");
    c->limit = o.buffer_bytes ? o.buffer_bytes : DEFAULT_BUFFER;
    c->overflow = o.overflow;
    c->block_timeout_ms = o.block_timeout_ms > 0 ? o.block_timeout_ms : 1000;
    c->linger_ms = o.linger_ms > 0 ? o.linger_ms : 5;
    c->max_frame = DEFAULT_MAX_FRAME;
    c->no_context_tags = o.no_context_tags != 0;
    while (c->session == 0)
        if (getrandom(&c->session, sizeof c->session, 0) != (ssize_t)sizeof c->session)
            c->session = (uint64_t)util_clock_ms(CLOCK_REALTIME) ^ ((uint64_t)getpid() << 32);
    proto_buf_init(&c->unacked, c->limit + 2 * (size_t)PROTO_MAX_BODY_HARD);
    c->next_seq = 1;
    c->fd = -1;
    c->backoff_seed = (unsigned)(c->session ^ c->session >> 32);
    /* Encoding never fails on the bound: admit() enforces it with slack to spare. */
    proto_buf_init(&c->pending, c->limit + 2 * (size_t)PROTO_MAX_BODY_HARD);
    proto_buf_init(&c->sendbuf, c->limit + 2 * (size_t)PROTO_MAX_BODY_HARD);
    c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    if (c->wake_fd < 0 || pthread_mutex_init(&c->mu, NULL) != 0 ||
        pthread_cond_init(&c->cv, &ca) != 0) {
        int e = errno;
        if (c->wake_fd >= 0)
            close(c->wake_fd);
        free(c);
        return -(e ? e : ENOMEM);
    }
    pthread_condattr_destroy(&ca);
    if (pthread_create(&c->io, NULL, shim_sender_main, c) != 0) {
        close(c->wake_fd);
        pthread_mutex_destroy(&c->mu);
        pthread_cond_destroy(&c->cv);
        free(c);
        return -EAGAIN;
    }
    registry_add(c);
    *out = c;
    return 0;
}

/*
 * Frees what a client owns once no sender thread uses it any more: joined by trackd_close(), or
 * absent in a forked child.
 */
static void client_free(trackd_client *c)
{
    proto_reader_free(&c->reader);
    proto_buf_free(&c->pending);
    proto_buf_free(&c->sendbuf);
    proto_buf_free(&c->unacked);
    shim_release_fds(c, UINT64_MAX);
    free(c->fds);
    free(c);
}

void trackd_close(trackd_client *c, int timeout_ms)
{
    if (c == NULL)
        return;
    registry_remove(c);
    if (c->forked) {
        /* No sender thread to join, and its locks may have been held at the fork. */
        client_free(c);
        return;
    }
    if (timeout_ms >= 0)
        trackd_flush(c, timeout_ms);
    pthread_mutex_lock(&c->mu);
    c->stop = true;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    wake(c);
    pthread_join(c->io, NULL);
    if (c->fd >= 0)
        close(c->fd);
    close(c->wake_fd);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    client_free(c);
}
