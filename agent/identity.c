#include "identity.h"

#include <ctype.h>
#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* One item: a decimal id, or a name looked up as a user (is_user) or a group. */
static int resolve(const char *item, bool is_user, unsigned long *id)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(item, &end, 10);
    if (*item && *end == '\0') {
        if (errno != 0 || v >= UINT32_MAX)
            return -ERANGE;
        *id = v;
        return 0;
    }
    char buf[4096];
    if (is_user) {
        struct passwd pw, *res = NULL;
        if (getpwnam_r(item, &pw, buf, sizeof buf, &res) != 0 || res == NULL)
            return -ENOENT;
        *id = res->pw_uid;
    } else {
        struct group gr, *res = NULL;
        if (getgrnam_r(item, &gr, buf, sizeof buf, &res) != 0 || res == NULL)
            return -ENOENT;
        *id = res->gr_gid;
    }
    return 0;
}

/* Splits list at commas into ids; *out is malloc'ed (NULL when the list is empty). */
static int parse_list(const char *list, const char *what, bool is_user, unsigned long **out,
                      size_t *n, char *msg, size_t msglen)
{
    *out = NULL;
    *n = 0;
    size_t cap = 0;
    const char *p = list;
    while (*p) {
        while (*p == ',' || isspace((unsigned char)*p))
            p++;
        if (*p == '\0')
            break;
        const char *start = p;
        while (*p && *p != ',')
            p++;
        const char *end = p;
        while (end > start && isspace((unsigned char)end[-1]))
            end--;
        char item[256];
        if ((size_t)(end - start) >= sizeof item) {
            snprintf(msg, msglen, "[agent] %s: an item is longer than %zu bytes", what,
                     sizeof item - 1);
            goto fail;
        }
        memcpy(item, start, (size_t)(end - start));
        item[end - start] = '\0';
        unsigned long id;
        int rc = resolve(item, is_user, &id);
        if (rc != 0) {
            snprintf(msg, msglen, "[agent] %s: %s \"%s\"", what,
                     rc == -ERANGE ? "id out of range"
                     : is_user     ? "no such user"
                                   : "no such group",
                     item);
            goto fail;
        }
        if (*n == cap) {
            cap = cap ? cap * 2 : 8;
            unsigned long *grown = realloc(*out, cap * sizeof **out);
            if (grown == NULL) {
                snprintf(msg, msglen, "out of memory");
                free(*out);
                *out = NULL;
                return -ENOMEM;
            }
            *out = grown;
        }
        (*out)[(*n)++] = id;
    }
    return 0;
fail:
    free(*out);
    *out = NULL;
    *n = 0;
    return -EINVAL;
}

static int cmp_gid(const void *a, const void *b)
{
    gid_t x = *(const gid_t *)a, y = *(const gid_t *)b;
    return x < y ? -1 : x > y;
}

int identity_rules_parse(struct identity_rules *r, const char *uids, const char *gids,
                         const char *shared_gids, char *msg, size_t msglen)
{
    memset(r, 0, sizeof *r);
    unsigned long *u = NULL, *g = NULL, *sh = NULL;
    size_t nu = 0, ng = 0, nsh = 0;
    int rc = parse_list(uids ? uids : "", "allowed_uids", true, &u, &nu, msg, msglen);
    if (rc == 0)
        rc = parse_list(gids ? gids : "", "allowed_gids", false, &g, &ng, msg, msglen);
    if (rc == 0)
        rc = parse_list(shared_gids ? shared_gids : "", "shared_gids", false, &sh, &nsh, msg,
                        msglen);
    if (rc == 0 && nsh > PEER_SHARED_MAX) {
        snprintf(msg, msglen, "[agent] shared_gids: %zu groups; at most %d", nsh, PEER_SHARED_MAX);
        rc = -EINVAL;
    }
    if (rc == 0 && ((nu && !(r->uids = calloc(nu, sizeof *r->uids))) ||
                    (ng && !(r->gids = calloc(ng, sizeof *r->gids))))) {
        snprintf(msg, msglen, "out of memory");
        rc = -ENOMEM;
    }
    if (rc == 0) {
        for (size_t i = 0; i < nu; i++)
            r->uids[i] = (uid_t)u[i];
        for (size_t i = 0; i < ng; i++)
            r->gids[i] = (gid_t)g[i];
        r->nuids = nu;
        r->ngids = ng;
        for (size_t i = 0; i < nsh; i++) {
            bool dup = false;
            for (size_t k = 0; k < r->nshared; k++)
                dup |= r->shared[k] == (gid_t)sh[i];
            if (!dup)
                r->shared[r->nshared++] = (gid_t)sh[i];
        }
        qsort(r->shared, r->nshared, sizeof r->shared[0], cmp_gid);
    } else {
        identity_rules_free(r);
    }
    free(u);
    free(g);
    free(sh);
    return rc;
}

static bool has_group(const gid_t *groups, size_t n, gid_t gid)
{
    for (size_t i = 0; i < n; i++)
        if (groups[i] == gid)
            return true;
    return false;
}

bool identity_allowed(const struct identity_rules *r, uid_t uid, const gid_t *groups, size_t n)
{
    /* The agent's own user (its operator, `trackd stats`) is always served. */
    if ((r->nuids == 0 && r->ngids == 0) || uid == geteuid())
        return true;
    for (size_t i = 0; i < r->nuids; i++)
        if (r->uids[i] == uid)
            return true;
    for (size_t i = 0; i < r->ngids; i++)
        if (has_group(groups, n, r->gids[i]))
            return true;
    return false;
}

void identity_peer(const struct identity_rules *r, uid_t uid, const gid_t *groups, size_t n,
                   struct peer *out)
{
    memset(out, 0, sizeof *out);
    out->uid = (uint32_t)uid;
    /* r->shared is ascending, so out->shared is too. */
    for (size_t i = 0; i < r->nshared; i++)
        if (has_group(groups, n, r->shared[i]))
            out->shared[out->nshared++] = (uint32_t)r->shared[i];
}

void identity_rules_free(struct identity_rules *r)
{
    free(r->uids);
    free(r->gids);
    memset(r, 0, sizeof *r);
}
