/*
 * Client connections: one per shim (training process) or `trackd stats`.
 * Each reads frames incrementally, requires a hello first, hands messages to
 * ingest, and writes welcome, flushed, error and stats frames back. The
 * peer's uid (SO_PEERCRED), not its word, names the run's user.
 */
#ifndef TRACKD_CONN_H
#define TRACKD_CONN_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "identity.h"
#include "session.h"
#include "trackd_proto.h"
#include "users.h"

struct trackd_config;
struct ingest;

enum conn_state {
    CONN_RESOLVING, /* waiting for the user name of its uid (users.h); not read */
    CONN_HELLO,     /* waiting for the client's hello */
    CONN_OPEN,      /* accepting messages */
    CONN_CLOSING    /* error sent or peer gone; closing once writes finish */
};

/* Flush barriers one connection may have waiting; the agent-wide bound is 65,536. */
#define CONN_MAX_FLUSHES 1024

struct conn_server;

struct conn {
    uv_pipe_t pipe;
    uint32_t id;
    enum conn_state state;
    struct conn_server *srv;
    uid_t uid;
    gid_t gid;
    pid_t pid;
    struct peer peer; /* uid and shared groups, for the run-owner rule */
    char user[USERS_NAME_MAX];
    struct users_wait user_wait; /* linked while CONN_RESOLVING */
    char program[128];
    char source_name[256];
    char source_type[16];
    bool context_tags;
    uint64_t session;   /* the client's id across reconnects; 0 = none */
    uint64_t last_seq;  /* highest frame seq accepted from this session */
    uint64_t acked_seq; /* highest seq acknowledged on this connection */
    uint64_t last_lsn;  /* journal record of the last frame accepted; acked once durable */
    struct proto_reader reader;
    bool reading;
    bool greeted;     /* the HELLO was the last frame read: the buffer goes back once empty */
    size_t out_bytes; /* queued for writing */
    int fds[8];       /* descriptors received ahead of their ARTIFACT frames */
    size_t nfds;
    bool snapshotting; /* frames wait until the artifact before them is in the spool */
    uint64_t errors_sent;
    uint32_t flushes_waiting; /* flush barriers not answered yet (CONN_MAX_FLUSHES) */
    /* Limits (see conn_sweep in conn.c); times are the loop's milliseconds. */
    uint64_t accepted_ms;
    uint64_t last_frame_ms;
    uint64_t partial_since_ms; /* first byte of the incomplete frame read; 0 = none */
    uint32_t frames_window;    /* frames read in the current rate window */
    bool rate_paused;          /* over max_frames_per_sec until the window ends */
    size_t read_cap;           /* reader memory counted in the server's read_bytes */
    struct conn *prev, *next;
};

/* The set of live connections and what they share. */
struct conn_server {
    uv_loop_t *loop;
    const struct trackd_config *cfg;
    struct ingest *ingest;
    struct conn *head;
    size_t count;
    uint32_t next_id;
    bool paused;   /* backpressure: no socket is read */
    bool draining; /* shutdown: no new messages */
    struct session_table sessions;
    struct journaler *journal;   /* NULL: frames are acknowledged once ingested */
    struct uploader *uploader;   /* NULL: ARTIFACT frames are refused */
    uint64_t durable_lsn;        /* the journal is written up to here */
    bool journal_full;           /* reads paused until the journal has room again */
    bool journal_stalled;        /* reads paused while journal writes fail (a full disk) */
    struct identity_rules rules; /* [agent] allowed_uids / allowed_gids */
    struct users users;          /* user names of peer uids, looked up off the loop */
    uv_timer_t sweep;            /* timeouts, rate windows, idle read buffers */
    uint64_t window_start_ms;
    size_t read_bytes; /* reader memory over all connections */
};

/* Returns 0, or an errno with msg saying what is wrong (an unknown allowed user, say). */
int conn_server_init(struct conn_server *s, uv_loop_t *loop, const struct trackd_config *cfg,
                     struct ingest *ingest, char *msg, size_t msglen);
/* Starts the periodic sweep that enforces the timeouts and rate windows. */
void conn_server_start(struct conn_server *s);
/* Accepts one pending connection from listener (or refuses it at the limit). */
void conn_accept(struct conn_server *s, uv_stream_t *listener);
struct conn *conn_find(struct conn_server *s, uint32_t id);
/* Queues an ERROR frame; counted as undeliverable if the client's queue is full. */
void conn_send_error(struct conn *c, uint64_t about_seq, uint32_t code, const char *message);
void conn_send_flushed(struct conn *c, uint64_t flush_seq);
/* Stops (true) or resumes (false) reading every connection. */
void conn_pause_all(struct conn_server *s, bool pause);
/* Stops reading for good (shutdown): later bytes are not accepted. */
void conn_drain_all(struct conn_server *s);
/* Closes every connection and the sweep timer (shutdown). */
void conn_close_all(struct conn_server *s);
/*
 * The artifact of frame seq is in the spool (rc 0), was already (-EEXIST), or could not be
 * taken (msg, the client's error text, says why): the frame counts as accepted and the frames
 * after it are read again.
 */
void conn_artifact_taken(struct conn *c, uint64_t seq, int rc, const char *msg);
/* The journal is durable up to lsn: acknowledge what every connection has there. */
void conn_journal_durable(struct conn_server *s, uint64_t lsn);
/* The journal has room again after being full. */
void conn_journal_room(struct conn_server *s);
/* Journal writes fail (stalled) or work again: no client is read meanwhile. */
void conn_journal_stalled(struct conn_server *s, bool stalled);
void conn_server_free(struct conn_server *s);

#endif
