/*
 * Socket file handling. A socket path that exists is probed first: if an
 * agent answers on it, starting a second one is an error; if nobody does, it
 * is a leftover from a crash and is replaced.
 */
#include "listener.h"

#include <errno.h>
#include <grp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "config.h"
#include "conn.h"
#include "log.h"

static void on_connection(uv_stream_t *server, int status)
{
    struct listener *l = server->data;
    if (status < 0) {
        log_limited(LOG_WARN, "[listener] accept failed: %s", uv_strerror(status));
        return;
    }
    conn_accept(l->srv, server);
}

/* True when something accepts connections on path. */
static bool socket_alive(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0)
        return false;
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    bool alive = connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
    close(fd);
    return alive;
}

static int resolve_group(const char *name, gid_t *gid)
{
    char *end;
    unsigned long v = strtoul(name, &end, 10);
    if (*name && *end == '\0') {
        *gid = (gid_t)v;
        return 0;
    }
    struct group gr, *res = NULL;
    char buf[4096];
    if (getgrnam_r(name, &gr, buf, sizeof buf, &res) != 0 || res == NULL)
        return -ENOENT;
    *gid = res->gr_gid;
    return 0;
}

int listener_start(struct listener *l, uv_loop_t *loop, const struct trackd_config *cfg,
                   struct conn_server *srv, char *msg, size_t msglen)
{
    struct stat st;
    int rc;
    memset(l, 0, sizeof *l);
    l->srv = srv;
    if (strlen(cfg->socket_path) >= sizeof l->path) {
        snprintf(msg, msglen, "socket path %s is longer than %zu bytes", cfg->socket_path,
                 sizeof l->path - 1);
        return -ENAMETOOLONG;
    }
    snprintf(l->path, sizeof l->path, "%s", cfg->socket_path);
    if (lstat(l->path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            snprintf(msg, msglen, "%s exists and is not a socket; choose another [agent] socket",
                     l->path);
            return -EEXIST;
        }
        if (socket_alive(l->path)) {
            snprintf(msg, msglen, "another agent is already listening on %s", l->path);
            return -EADDRINUSE;
        }
        log_info("[listener] removing stale socket %s", l->path);
        unlink(l->path);
    }
    uv_pipe_init(loop, &l->pipe, 0);
    l->pipe.data = l;
    if ((rc = uv_pipe_bind(&l->pipe, l->path)) != 0) {
        snprintf(msg, msglen, "cannot bind %s: %s (does the directory exist and is it writable?)",
                 l->path, uv_strerror(rc));
        goto fail;
    }
    l->bound = true;
    if (chmod(l->path, cfg->socket_mode) != 0) {
        rc = -errno;
        snprintf(msg, msglen, "cannot chmod %s to %o: %s", l->path, cfg->socket_mode,
                 strerror(errno));
        goto fail;
    }
    if (cfg->socket_group && cfg->socket_group[0]) {
        gid_t gid;
        if (resolve_group(cfg->socket_group, &gid) != 0) {
            rc = -ENOENT;
            snprintf(msg, msglen, "[agent] socket_group %s: no such group", cfg->socket_group);
            goto fail;
        }
        if (chown(l->path, (uid_t)-1, gid) != 0) {
            rc = -errno;
            snprintf(msg, msglen, "cannot give %s to group %s: %s", l->path, cfg->socket_group,
                     strerror(errno));
            goto fail;
        }
    }
    if ((rc = uv_listen((uv_stream_t *)&l->pipe, 511, on_connection)) != 0) {
        snprintf(msg, msglen, "cannot listen on %s: %s", l->path, uv_strerror(rc));
        goto fail;
    }
    log_info("[listener] listening on %s (mode %04o)", l->path, cfg->socket_mode);
    return 0;
fail:
    listener_close(l);
    return rc;
}

void listener_close(struct listener *l)
{
    if (!uv_is_closing((uv_handle_t *)&l->pipe))
        uv_close((uv_handle_t *)&l->pipe, NULL);
    if (l->bound)
        unlink(l->path);
    l->bound = false;
}
