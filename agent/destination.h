/*
 * Where artifacts may go: the operator's choice, never a client's. A client may name an
 * experiment's artifact_location, and a run's artifact_uri follows it; on a shared node that
 * would let any local user make the agent (running as another user) create files anywhere
 * it can write, or send them to any host. A destination is allowed when it is
 *   - a local path or file:// URI at or below mlflow.default_artifact_root or a local entry
 *     of [artifacts] allowed_roots;
 *   - mlflow-artifacts:/path without a host, when [artifacts] mlflow_server_url is set (or
 *     below an allowed_roots entry such as "mlflow-artifacts:/");
 *     mlflow-artifacts://, http:// or https:// with that server's host[:port];
 *   - any other URI (s3://bucket/prefix/...) at or below mlflow.default_artifact_root or an
 *     entry of allowed_roots.
 * A path with an empty, "." or ".." segment is never allowed. Pure functions of the
 * configuration, usable on any thread.
 */
#ifndef TRACKD_DESTINATION_H
#define TRACKD_DESTINATION_H

#include <stddef.h>

struct trackd_config;

/*
 * NULL when artifacts may go to uri (len bytes, not NUL-terminated), else why not, in buf:
 * a sentence naming uri and what the operator can configure.
 */
const char *destination_problem(const struct trackd_config *cfg, const char *uri, size_t len,
                                char *buf, size_t buflen);

/*
 * For an allowed local destination (a path or file:// URI): the root directory it is below
 * (into root, without a trailing '/') and the path below it (*below points into uri; "" for
 * the root itself). Returns 0, or -EPERM when uri is not an allowed local destination.
 */
int destination_local_root(const struct trackd_config *cfg, const char *uri, char *root,
                           size_t rootlen, const char **below);

#endif
