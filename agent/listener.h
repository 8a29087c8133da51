/*
 * The Unix-socket listener: binds the configured path (replacing a stale
 * socket left by a crash, refusing to steal a live one), applies the file
 * mode and group, and passes each connection to conn_accept().
 */
#ifndef TRACKD_LISTENER_H
#define TRACKD_LISTENER_H

#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

struct trackd_config;
struct conn_server;

struct listener {
    uv_pipe_t pipe;
    struct conn_server *srv;
    char path[108];
    bool bound;
};

/* Returns 0 or a negative uv/errno code with a sentence in msg. */
int listener_start(struct listener *l, uv_loop_t *loop, const struct trackd_config *cfg,
                   struct conn_server *srv, char *msg, size_t msglen);
/* Stops accepting and removes the socket file. */
void listener_close(struct listener *l);

#endif
