/*
 * What the three files of libtrackd share: the client struct, whose fields are split between
 * the logging calls (shim.c), the sender thread (sender.c) and open/close (client.c), and the
 * few helpers more than one of them calls. Private to the library and not installed: hidden in
 * libtrackd.so (-fvisibility=hidden), and prefixed shim_ where libtrackd.a must show a name.
 */
#ifndef TRACKD_SHIM_INTERNAL_H
#define TRACKD_SHIM_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "trackd.h"
#include "trackd_proto.h"

#define SEND_THRESHOLD (256u * 1024u) /* send at once above this */
#define ERROR_QUEUE 256

enum io_state { IO_DISCONNECTED, IO_CONNECTED };

struct trackd_client {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* space freed, barrier reached, sender stopped */
    pthread_t io;
    int wake_fd;
    char socket_path[108];
    char source_name[256];
    char source_type[16];
    char program[128];
    size_t limit;
    uint32_t max_frame; /* largest frame body the agent accepts */
    int overflow;
    int block_timeout_ms;
    int linger_ms;
    bool no_context_tags;

    /* Shared, under mu. */
    struct proto_buf pending;
    uint64_t pending_events;
    bool metrics_open;
    size_t metrics_off;
    char metrics_run[PROTO_RUN_ID_LEN];
    uint64_t next_seq;
    uint64_t flush_wanted; /* highest flush seq a caller waits for */
    uint64_t flushed;      /* highest flush seq the agent answered */
    uint64_t session;      /* random id naming this client across reconnects */
    size_t unacked_bytes;  /* sent frames the agent has not acknowledged (see unacked) */
    bool welcomed;         /* a welcome arrived on some connection */
    char backend_uri[1024];
    bool io_idle;
    bool threshold_woken; /* the sender was woken for a full buffer since the last swap */
    bool stop;
    struct trackd_counters ctr;
    struct trackd_error errs[ERROR_QUEUE];
    size_t err_head, err_count;

    /* Open files of ARTIFACT frames, by frame seq, until the agent acknowledges them. */
    struct fd_slot {
        uint64_t seq;
        int fd;
    } * fds;
    size_t nfds, capfds;

    bool forked;         /* set in a forked child; see CHECK_USABLE (shim.c) */
    trackd_client *next; /* all open clients, for the fork handler */

    /* Sender thread only. */
    struct proto_buf unacked; /* sent, not yet acknowledged: resent after a reconnect */
    uint64_t unacked_events;  /* events in unacked (an upper bound after partial acks) */
    uint64_t agent_acked;     /* highest seq the agent acknowledged */
    enum io_state state;
    int fd;
    struct proto_reader reader;
    struct proto_buf sendbuf;
    unsigned reconnect_failures; /* since the last connection; for util_backoff_ms */
    unsigned backoff_seed;       /* rand_r state for the backoff's jitter */
    bool ever_connected;
    int64_t last_send_ms; /* monotonic; see WARM_IDLE_MS (sender.c) */
};

/* Wakes the sender thread from its poll() (see appended() in shim.c for when producers do). */
static inline void wake(struct trackd_client *c)
{
    uint64_t one = 1;
    ssize_t r = write(c->wake_fd, &one, sizeof one);
    (void)r; /* a full counter already means "wake up" */
}

/* A C string (NULL reads as "") as the encoder takes strings. */
static inline struct proto_str to_str(const char *s)
{
    return (struct proto_str){s ? s : "", s ? (uint32_t)strlen(s) : 0};
}

/*
 * The sender thread's body (sender.c): trackd_open() starts it with the client as arg, and
 * trackd_close() joins it after setting stop. Returns NULL.
 */
void *shim_sender_main(void *arg);

/*
 * Closes the files of ARTIFACT frames up to seq acked and drops their slots; UINT64_MAX closes
 * all of them. The sender thread calls it with mu held, trackd_close() once the sender is gone.
 */
void shim_release_fds(struct trackd_client *c, uint64_t acked);

#endif
