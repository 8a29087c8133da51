/*
 * The journal directory's lock and identity. A second agent on the same directory (a second
 * unit, a container restarting while the old one still runs) would replay, commit and release
 * records the first one still holds, and both would append to one segment; the lock refuses it
 * at start instead.
 */
#define _GNU_SOURCE /* getrandom */
#include "journaldir.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

#define LOCK_FILE "lock"
#define ID_FILE "journal.id"

int journaldir_lock(const char *dir, char *msg, size_t msglen)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, LOCK_FILE);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        int e = errno;
        snprintf(msg, msglen, "cannot open the journal lock %s: %s", path, strerror(e));
        return -e;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        if (e != EWOULDBLOCK) {
            snprintf(msg, msglen, "cannot lock the journal %s: %s", path, strerror(e));
            close(fd);
            return -e;
        }
        char pid[32] = "";
        ssize_t n = pread(fd, pid, sizeof pid - 1, 0);
        pid[n > 0 ? n : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        snprintf(msg, msglen,
                 "the journal directory %s is in use by another trackd agent (pid %s): each agent "
                 "needs a [journal] dir of its own; stop the other agent or point this one "
                 "elsewhere",
                 dir, pid[0] ? pid : "unknown");
        close(fd);
        return -EWOULDBLOCK;
    }
    char line[32];
    int len = snprintf(line, sizeof line, "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) != 0 || pwrite(fd, line, (size_t)len, 0) != len) {
        int e = errno;
        snprintf(msg, msglen, "cannot write the journal lock %s: %s", path, strerror(e));
        close(fd);
        return -e;
    }
    return fd;
}

static int read_id(const char *path, char id[JOURNALDIR_ID_LEN + 1], char *msg, size_t msglen)
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -errno;
    char buf[64] = "";
    if (fgets(buf, sizeof buf, f) == NULL)
        buf[0] = '\0';
    fclose(f);
    buf[strcspn(buf, "\n")] = '\0';
    if (strlen(buf) != JOURNALDIR_ID_LEN || strspn(buf, "0123456789abcdef") != JOURNALDIR_ID_LEN) {
        snprintf(msg, msglen,
                 "%s is not a journal identity (32 lower-case hex digits); it was not written by "
                 "trackd: restore it, or move the journal directory aside to start a new journal",
                 path);
        return -EINVAL;
    }
    memcpy(id, buf, JOURNALDIR_ID_LEN + 1);
    return 0;
}

/* True when dir holds a segment, live or quarantined: its LSNs go on from there. */
static bool has_segments(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return true; /* cannot tell: keep the identity */
    bool found = false;
    for (struct dirent *e; !found && (e = readdir(d)) != NULL;)
        found = strncmp(e->d_name, "seg-", 4) == 0;
    closedir(d);
    return found;
}

int journaldir_identity(const char *dir, char id[JOURNALDIR_ID_LEN + 1], char *msg, size_t msglen)
{
    char path[4200], tmp[4220];
    snprintf(path, sizeof path, "%s/%s", dir, ID_FILE);
    /* Without segments the LSNs start again at 1, so the identity must be new too: a
     * progress row of the old one would otherwise cover records never committed. */
    if (!has_segments(dir) && unlink(path) != 0 && errno != ENOENT) {
        int e = errno;
        snprintf(msg, msglen, "cannot replace the journal identity %s: %s", path, strerror(e));
        return -e;
    }
    int rc = read_id(path, id, msg, msglen);
    if (rc != -ENOENT) {
        if (rc < 0 && rc != -EINVAL)
            snprintf(msg, msglen, "cannot read %s: %s", path, strerror(-rc));
        return rc;
    }
    unsigned char raw[JOURNALDIR_ID_LEN / 2];
    if (getrandom(raw, sizeof raw, 0) != (ssize_t)sizeof raw) {
        int e = errno;
        snprintf(msg, msglen, "cannot make a journal identity: getrandom: %s", strerror(e));
        return -e;
    }
    for (size_t i = 0; i < sizeof raw; i++)
        snprintf(id + 2 * i, 3, "%02x", raw[i]);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    char line[JOURNALDIR_ID_LEN + 2];
    snprintf(line, sizeof line, "%s\n", id);
    int e = 0;
    if (fd < 0)
        e = errno;
    else if (write(fd, line, sizeof line - 1) != (ssize_t)(sizeof line - 1) || fsync(fd) != 0)
        e = errno ? errno : EIO;
    if (fd >= 0)
        close(fd);
    /* link, not rename: an identity is never replaced, even by a racing start. */
    if (e == 0 && link(tmp, path) != 0)
        e = errno;
    unlink(tmp);
    if (e == EEXIST)
        return read_id(path, id, msg, msglen);
    if (e != 0) {
        snprintf(msg, msglen, "cannot write the journal identity %s: %s", path, strerror(e));
        return -e;
    }
    util_fsync_dir(dir); /* the id is written; a lost name only makes a new one next start */
    return 0;
}
