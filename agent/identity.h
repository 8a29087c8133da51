/*
 * Who a client is and what it may do: [agent] allowed_uids, allowed_gids and shared_gids,
 * resolved once at start-up (names through NSS, which may block, so never on the loop), then
 * checked against each peer's credentials as the kernel reports them (SO_PEERCRED for the uid
 * and primary gid, SO_PEERGROUPS for the supplementary groups).
 */
#ifndef TRACKD_IDENTITY_H
#define TRACKD_IDENTITY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* At most this many groups in [agent] shared_gids. */
#define PEER_SHARED_MAX 16

struct identity_rules {
    uid_t *uids; /* allowed_uids */
    size_t nuids;
    gid_t *gids; /* allowed_gids */
    size_t ngids;
    gid_t shared[PEER_SHARED_MAX]; /* shared_gids: members may write each other's runs */
    size_t nshared;
};

/*
 * A client as the socket proves it, and as the journal keeps it with each frame: its uid and
 * those of its groups (primary or supplementary, at connect time) that are in [agent]
 * shared_gids. This is what the run-owner rule (agent/owners.h) looks at.
 */
struct peer {
    uint32_t uid;
    uint8_t nshared;
    uint32_t shared[PEER_SHARED_MAX]; /* ascending */
};

/*
 * Parses the three comma-separated lists of names or numeric ids ("alice, 1001"); blanks
 * around items are ignored; any list may be NULL. Returns 0, or -EINVAL / -ENOMEM with msg
 * saying which key, which item and why (also when shared_gids names more than
 * PEER_SHARED_MAX groups).
 */
int identity_rules_parse(struct identity_rules *r, const char *uids, const char *gids,
                         const char *shared_gids, char *msg, size_t msglen);
/*
 * With no allow-list at all everyone is allowed; otherwise the uid, or one of the peer's
 * groups (groups[0..n), the primary one included), must be listed, or the uid be the
 * agent's own.
 */
bool identity_allowed(const struct identity_rules *r, uid_t uid, const gid_t *groups, size_t n);
/* Fills out for a peer of uid whose groups (primary included) are groups[0..n). */
void identity_peer(const struct identity_rules *r, uid_t uid, const gid_t *groups, size_t n,
                   struct peer *out);
void identity_rules_free(struct identity_rules *r);

#endif
