/*
 * Who may connect: [agent] allowed_uids and allowed_gids, resolved once at
 * start-up (names through NSS, which may block, so never on the loop), then
 * checked against each peer's SO_PEERCRED credentials.
 */
#ifndef TRACKD_IDENTITY_H
#define TRACKD_IDENTITY_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

struct identity_rules {
    uid_t *uids;
    size_t nuids;
    gid_t *gids;
    size_t ngids;
};

/*
 * Parses comma-separated names or numeric ids ("alice, 1001"); blanks around
 * items are ignored. Returns 0, or -EINVAL / -ENOMEM with msg saying which
 * item and why.
 */
int identity_rules_parse(struct identity_rules *r, const char *uids, const char *gids, char *msg,
                         size_t msglen);
/*
 * With no rule at all everyone is allowed; otherwise the uid or the gid must
 * be listed, or the uid be the agent's own.
 */
bool identity_allowed(const struct identity_rules *r, uid_t uid, gid_t gid);
void identity_rules_free(struct identity_rules *r);

#endif
