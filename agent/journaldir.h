/*
 * The journal directory's own files, besides the segments (agent/JOURNAL.md): the lock that
 * makes one agent its only user, and the identity that names its progress row in PostgreSQL.
 * Both are used once at start, before the replay; nothing here runs on the loop.
 */
#ifndef TRACKD_JOURNALDIR_H
#define TRACKD_JOURNALDIR_H

#include <stddef.h>

#define JOURNALDIR_ID_LEN 32 /* hex digits */

/*
 * Takes dir for this process: an exclusive flock(2) on <dir>/lock, held until the process
 * exits (the descriptor stays open, close-on-exec), after which the file holds this pid.
 * Returns the descriptor, or -EWOULDBLOCK when another process holds it (msg names dir and
 * that process's pid, as the file says), or another -errno with msg.
 */
int journaldir_lock(const char *dir, char *msg, size_t msglen);

/*
 * The journal's identity: 32 random hex digits in <dir>/journal.id, made at the first start
 * (written to a temporary name, fsynced, linked into place, the directory fsynced) and read
 * afterwards. A directory without segment files (new, or emptied by hand) gets a new one,
 * since its LSNs start again at 1. Returns 0 with id (NUL-terminated) or -errno with msg; a
 * file that is not 32 hex digits is an error, never replaced.
 */
int journaldir_identity(const char *dir, char id[JOURNALDIR_ID_LEN + 1], char *msg, size_t msglen);

#endif
