/*
 * Upload transports: one blocking put of a spooled artifact to its store, for a worker
 * thread. Local paths and file:// URIs (copied below the artifact root without following
 * links, then renamed into place, so MLflow never lists a partial file), mlflow-artifacts:
 * (an HTTP PUT to MLflow's artifact proxy) and s3:// (SigV4, s3.c). No loop, no shared state.
 */
#ifndef TRACKD_TRANSPORTS_H
#define TRACKD_TRANSPORTS_H

#include <stdbool.h>
#include <stddef.h>

#include "s3.h"
#include "spool.h"

/* Where stores are, for every put: set at start, read-only afterwards. */
struct transports {
    char mlflow_server[1024]; /* serves mlflow-artifacts: URIs without a host; "" none */
    struct s3_config s3;      /* signs s3:// uploads; zeroed: none */
};

/* One upload: everything a worker needs, owned by the caller until the put returns. */
struct transport_put {
    const struct spool *spool;
    const struct spool_entry *e; /* the artifact: its id names the spool copy; size, sha256 */
    const char *uri;             /* the full destination URI (allowed: destination.h) */
    const char *local_root;      /* a local destination's artifact root, else NULL */
    const char *below;           /* with local_root: the rest of the destination below it */
};

/* mlflow_server ("" or NULL: none) loses any trailing '/'; s3 NULL: none. */
void transports_init(struct transports *t, const char *mlflow_server, const struct s3_config *s3);
/*
 * Worker thread: uploads p->e's spool copy to p->uri. 0, or -errno with msg: -EPERM a local
 * destination below no allowed root, -EDESTADDRREQ an mlflow-artifacts: URI without a host
 * and no server configured, -EPROTONOSUPPORT a scheme no transport serves; store errors as
 * http.h and s3.h map them (transports_retryable tells which are worth another attempt).
 */
int transport_put(const struct transports *t, const struct transport_put *p, char *msg,
                  size_t msglen);
/* Errors of a store that is down or full, as opposed to a file that cannot go there. */
bool transports_retryable(int rc);

#endif
