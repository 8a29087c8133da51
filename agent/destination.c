/*
 * Artifact destinations allowed by the configuration (see destination.h).
 */
#include "destination.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "config.h"

struct span {
    const char *p;
    size_t n;
};

static bool starts(struct span s, const char *prefix)
{
    size_t n = strlen(prefix);
    return s.n >= n && strncasecmp(s.p, prefix, n) == 0;
}

static struct span strip_slashes(struct span s)
{
    while (s.n > 1 && s.p[s.n - 1] == '/')
        s.n--;
    return s;
}

/* The absolute path a path or file:// URI names; n = 0 when s is neither. */
static struct span local_path(struct span s)
{
    if (starts(s, "file://"))
        s = (struct span){s.p + 7, s.n - 7};
    if (s.n == 0 || s.p[0] != '/')
        return (struct span){s.p, 0};
    return strip_slashes(s);
}

/* No empty, "." or ".." segment after the first character (a path's leading '/'). */
static bool segments_ok(struct span s)
{
    size_t i = s.n && s.p[0] == '/' ? 1 : 0;
    while (i <= s.n) {
        size_t j = i;
        while (j < s.n && s.p[j] != '/')
            j++;
        size_t len = j - i;
        if (len == 0 || (len == 1 && s.p[i] == '.') ||
            (len == 2 && s.p[i] == '.' && s.p[i + 1] == '.'))
            return false;
        i = j + 1;
    }
    return true;
}

/* s at or below root, on a segment boundary. */
static bool below(struct span s, struct span root)
{
    return s.n >= root.n && memcmp(s.p, root.p, root.n) == 0 &&
           (s.n == root.n || s.p[root.n] == '/' || (root.n == 1 && root.p[0] == '/'));
}

/* The authority ("host[:port]") of scheme://authority/...; n = 0 when there is none. */
static struct span authority(struct span s)
{
    const char *sep = memchr(s.p, ':', s.n);
    if (sep == NULL || (size_t)(s.p + s.n - sep) < 3 || sep[1] != '/' || sep[2] != '/')
        return (struct span){s.p, 0};
    const char *a = sep + 3, *end = s.p + s.n;
    size_t n = 0;
    while (a + n < end && a[n] != '/')
        n++;
    return (struct span){a, n};
}

/* Calls visit for mlflow.default_artifact_root and each allowed_roots entry until it returns true.
 */
static bool any_root(const struct trackd_config *cfg, bool (*visit)(struct span root, void *),
                     void *ctx)
{
    const char *def = cfg->artifact_root ? cfg->artifact_root : "";
    if (def[0] && visit(strip_slashes((struct span){def, strlen(def)}), ctx))
        return true;
    const char *list = cfg->allowed_roots ? cfg->allowed_roots : "";
    while (*list) {
        list += strspn(list, " ,");
        size_t n = strcspn(list, ",");
        size_t m = n;
        while (m > 0 && list[m - 1] == ' ')
            m--;
        if (m > 0 && visit(strip_slashes((struct span){list, m}), ctx))
            return true;
        list += n;
    }
    return false;
}

struct match {
    struct span uri;   /* as given */
    struct span local; /* its local path, n = 0 when not local */
    struct span root;  /* the matching root's local path, when local */
};

static bool visit_match(struct span root, void *arg)
{
    struct match *m = arg;
    struct span rl = local_path(root);
    if (m->local.n > 0) {
        if (rl.n > 0 && below(m->local, rl)) {
            m->root = rl;
            return true;
        }
        return false;
    }
    return rl.n == 0 && below(strip_slashes(m->uri), root);
}

static bool same_server(const struct trackd_config *cfg, struct span auth)
{
    const char *url = cfg->mlflow_server_url ? cfg->mlflow_server_url : "";
    struct span server = authority((struct span){url, strlen(url)});
    return server.n > 0 && server.n == auth.n && strncasecmp(server.p, auth.p, auth.n) == 0;
}

static bool allowed(const struct trackd_config *cfg, struct span uri, struct match *m)
{
    *m = (struct match){uri, local_path(uri), {NULL, 0}};
    if (m->local.n > 0)
        return segments_ok(m->local) && any_root(cfg, visit_match, m);
    if (starts(uri, "mlflow-artifacts:") && !starts(uri, "mlflow-artifacts://")) {
        struct span path = {uri.p + 17, uri.n - 17};
        if (path.n == 0 || path.p[0] != '/' || !segments_ok(strip_slashes(path)))
            return false;
        return (cfg->mlflow_server_url && cfg->mlflow_server_url[0]) ||
               any_root(cfg, visit_match, m);
    }
    struct span auth = authority(uri);
    if (auth.n > 0) {
        struct span path = {auth.p + auth.n, (size_t)(uri.p + uri.n - (auth.p + auth.n))};
        if (path.n > 0 && !segments_ok(strip_slashes(path)))
            return false;
        if ((starts(uri, "mlflow-artifacts://") || starts(uri, "http://") ||
             starts(uri, "https://")) &&
            same_server(cfg, auth))
            return true;
    }
    return any_root(cfg, visit_match, m);
}

const char *destination_problem(const struct trackd_config *cfg, const char *uri, size_t len,
                                char *buf, size_t buflen)
{
    struct match m;
    if (allowed(cfg, (struct span){uri, len}, &m))
        return NULL;
    snprintf(buf, buflen,
             "artifact destination '%.*s' is not below an artifact root this agent may write to "
             "(mlflow.default_artifact_root, [artifacts] allowed_roots, or the [artifacts] "
             "mlflow_server_url server), or has an empty, '.' or '..' segment; ask the "
             "agent's operator to add its root to [artifacts] allowed_roots",
             (int)(len > 300 ? 300 : len), uri);
    return buf;
}

int destination_local_root(const struct trackd_config *cfg, const char *uri, char *root,
                           size_t rootlen, const char **below_out)
{
    struct match m;
    if (!allowed(cfg, (struct span){uri, strlen(uri)}, &m) || m.local.n == 0 || m.root.n == 0 ||
        m.root.n >= rootlen)
        return -EPERM;
    memcpy(root, m.root.p, m.root.n);
    root[m.root.n] = '\0';
    const char *rest = m.local.p + m.root.n;
    while (*rest == '/')
        rest++;
    *below_out = rest;
    return 0;
}
