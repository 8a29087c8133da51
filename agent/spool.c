/*
 * The artifact spool's files (spool.h). A copy reads the client's descriptor with pread, hashes
 * it with SHA-256 and writes <id>.part, renamed to <id>.data once fsynced; the record goes to
 * <id>.meta.part, fsynced, renamed, and the directory fsynced: a .meta names a whole copy.
 */
#define _GNU_SOURCE /* copy_file_range, sync_file_range */
#include "spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "util.h"

/* One record: id, run, size, sha256, peer (at most 256 bytes), path, tabs, newline. */
#define SPOOL_LINE_MAX (ARTIFACT_PATH_MAX + 512)
#define COPY_BUF (1024 * 1024)
#define WRITEBACK_CHUNK (8ull << 20)

int spool_open(struct spool *s, const char *journal_dir, char *msg, size_t msglen)
{
    if ((size_t)snprintf(s->dir, sizeof s->dir, "%s/artifacts", journal_dir) >= sizeof s->dir) {
        snprintf(msg, msglen, "journal directory name too long");
        return -ENAMETOOLONG;
    }
    if (mkdir(s->dir, 0700) != 0 && errno != EEXIST)
        return util_errorf(msg, msglen, -errno, "cannot create the artifact spool %s", s->dir);
    return 0;
}

void spool_file(const struct spool *s, const char *id, const char *ext, char *out, size_t n)
{
    snprintf(out, n, "%s/%s%s", s->dir, id, ext);
}

/* A copy's pace since its rate was last set. */
struct pace {
    int64_t t0_us; /* 0: not pacing */
    uint64_t bytes;
    uint64_t rate;
};

uint64_t spool_pace_rate(uint64_t rows_per_sec, uint64_t queue_events, uint64_t queue_bytes,
                         uint64_t max_pending_bytes)
{
    if (max_pending_bytes && queue_bytes >= max_pending_bytes / 4)
        return SPOOL_PACE_BACKLOG;
    return rows_per_sec > 0 || queue_events > 0 ? SPOOL_PACE_STREAMING : 0;
}

void spool_pace_events(struct spool *s)
{
    if (atomic_load_explicit(&s->pace_bytes_per_s, memory_order_relaxed) == 0)
        atomic_store_explicit(&s->pace_bytes_per_s, SPOOL_PACE_STREAMING, memory_order_relaxed);
}

int64_t spool_pace_wait_us(uint64_t bytes, int64_t elapsed_us, uint64_t bytes_per_s)
{
    uint64_t per_us = bytes_per_s / 1000000u;
    int64_t due = (int64_t)(bytes / (per_us ? per_us : 1));
    return due > elapsed_us ? due - elapsed_us : 0;
}

/*
 * n more bytes were copied: sleeps as long as it takes to keep the copy at the spool's pace
 * on average since that pace was set (the bench's W3: a 512 MiB artifact during a stream of
 * metrics); with no pace, goes at full speed.
 */
static void pace(const struct spool *s, struct pace *p, uint64_t n)
{
    uint64_t rate = atomic_load_explicit(&s->pace_bytes_per_s, memory_order_relaxed);
    if (rate == 0) {
        p->t0_us = 0;
        return;
    }
    int64_t now = util_clock_us(CLOCK_MONOTONIC);
    if (p->t0_us == 0 || p->rate != rate) {
        p->t0_us = now;
        p->bytes = 0;
        p->rate = rate;
    }
    p->bytes += n;
    int64_t us = spool_pace_wait_us(p->bytes, now - p->t0_us, rate);
    if (us > 0) {
        struct timespec ts = {(time_t)(us / 1000000), (long)(us % 1000000) * 1000};
        nanosleep(&ts, NULL);
    }
}

/*
 * Starts writeback of each 8 MiB as soon as it is written and waits for the chunk before,
 * so a large artifact never leaves hundreds of MiB dirty for one final fsync to flush in a
 * burst that the journal's and PostgreSQL's own fsyncs would queue behind.
 */
static void writeback(int fd, uint64_t written, uint64_t *started)
{
    while (written - *started >= WRITEBACK_CHUNK) {
        sync_file_range(fd, (off_t)*started, (off_t)WRITEBACK_CHUNK, SYNC_FILE_RANGE_WRITE);
        if (*started >= WRITEBACK_CHUNK)
            sync_file_range(fd, (off_t)(*started - WRITEBACK_CHUNK), (off_t)WRITEBACK_CHUNK,
                            SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                SYNC_FILE_RANGE_WAIT_AFTER);
        *started += WRITEBACK_CHUNK;
    }
}

/* ---- room ------------------------------------------------------------------------------ */

enum room { ROOM_NOW, ROOM_LATER, ROOM_NEVER };

/*
 * Room for a copy of size bytes, leaving the journal on the same file system its reserve:
 * SPOOL_RESERVE, or an eighth of a smaller file system. ROOM_NEVER when not even an empty
 * file system would have it.
 */
static enum room room_for(const struct spool *s, uint64_t size)
{
    struct statvfs vfs;
    if (statvfs(s->dir, &vfs) != 0)
        return ROOM_NOW; /* the copy itself will say */
    uint64_t total = (uint64_t)vfs.f_blocks * vfs.f_frsize;
    uint64_t reserve = total / 8 < SPOOL_RESERVE ? total / 8 : SPOOL_RESERVE;
    if (size + reserve > total)
        return ROOM_NEVER;
    return (uint64_t)vfs.f_bavail * vfs.f_frsize >= size + reserve ? ROOM_NOW : ROOM_LATER;
}

int spool_check(const struct spool *s, struct spool_entry *e, int fd, char *msg, size_t msglen)
{
    char meta[4200];
    spool_file(s, e->id, ".meta", meta, sizeof meta);
    if (access(meta, F_OK) == 0)
        return -EEXIST;
    /* Only regular files: a pipe or /dev/zero would never end or never start. */
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(msg, msglen, "the descriptor is not a regular file");
        return -EBADF;
    }
    e->size = (uint64_t)st.st_size; /* until the copy says how much it took */
    switch (room_for(s, e->size)) {
    case ROOM_NEVER:
        snprintf(msg, msglen,
                 "the agent's spool has no room for it even when empty (its file system's "
                 "size, less the room kept for the journal)");
        return -EFBIG;
    case ROOM_LATER: return -ENOSPC;
    case ROOM_NOW: break;
    }
    return 0;
}

/* ---- the copy ---------------------------------------------------------------------------- */

static int copy_and_hash(const struct spool *s, struct spool_entry *e, int in, int out,
                         uint8_t *buf, char *msg, size_t msglen)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (md == NULL || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(md);
        return util_errorf(msg, msglen, -ENOMEM, "cannot start SHA-256");
    }
    uint64_t off = 0, started = 0;
    struct pace pc = {0, 0, 0};
    int rc = 0;
    for (;;) {
        ssize_t n = pread(in, buf, COPY_BUF, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = util_errorf(msg, msglen, -errno, "cannot read the client's file");
            break;
        }
        if (n == 0)
            break;
        EVP_DigestUpdate(md, buf, (size_t)n);
        if ((rc = util_write_full(out, buf, (size_t)n)) != 0) {
            util_errorf(msg, msglen, rc, "cannot write the spool copy in %s", s->dir);
            break;
        }
        off += (uint64_t)n;
        writeback(out, off, &started);
        pace(s, &pc, (uint64_t)n);
    }
    uint8_t digest[32];
    unsigned len = 0;
    EVP_DigestFinal_ex(md, digest, &len);
    EVP_MD_CTX_free(md);
    for (unsigned i = 0; i < 32; i++)
        snprintf(e->sha256 + 2 * i, 3, "%02x", digest[i]);
    e->size = off;
    return rc;
}

static uint64_t ts_ns(struct timespec t)
{
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void describe_state(char *out, size_t n, uint64_t size, uint64_t mtime_ns)
{
    time_t secs = (time_t)(mtime_ns / 1000000000u);
    struct tm tm;
    char when[32] = "?";
    if (gmtime_r(&secs, &tm))
        strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, n, "%" PRIu64 " bytes, modified %s.%09" PRIu64 "Z", size, when,
             mtime_ns % 1000000000u);
}

/*
 * After the copy: the file must still be what the client saw at the call (size and mtime;
 * not ctime, which unlinking or renaming the file changes), and the copy as long as it.
 * Otherwise it was rewritten in place after the call and the copy holds bytes of some other
 * moment: nothing is stored.
 */
static int check_unchanged(const struct spool_entry *e, int fd, const struct proto_file_seen *seen,
                           char *msg, size_t msglen)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return util_errorf(msg, msglen, -errno, "cannot stat the client's file");
    if ((uint64_t)st.st_size == e->size && e->size == seen->size &&
        (seen->mtime_ns == 0 || ts_ns(st.st_mtim) == seen->mtime_ns))
        return 0;
    char then[96], now[96];
    describe_state(then, sizeof then, seen->size, seen->mtime_ns);
    describe_state(now, sizeof now, (uint64_t)st.st_size, ts_ns(st.st_mtim));
    snprintf(msg, msglen,
             "the file changed after log_artifact (at the call: %s; when copied: %s), so nothing "
             "was stored: write each version to a new file, or flush before rewriting it",
             then, now);
    return -ESTALE;
}

/*
 * The record's peer field: "-" without one, else "uid:gid,gid:user" (the user name with any
 * tab, newline or ':' replaced by '?'; it is only ever compared with names that have none).
 */
static void format_peer(const struct spool_entry *e, char *out, size_t n)
{
    if (!e->has_peer) {
        snprintf(out, n, "-");
        return;
    }
    size_t k = (size_t)snprintf(out, n, "%" PRIu32 ":", e->peer.uid);
    for (int i = 0; i < e->peer.nshared && k < n; i++)
        k += (size_t)snprintf(out + k, n - k, "%s%" PRIu32, i ? "," : "", e->peer.shared[i]);
    if (k < n)
        k += (size_t)snprintf(out + k, n - k, ":");
    for (const char *u = e->user; *u && k + 1 < n; u++)
        out[k++] = (*u == '\t' || *u == '\n' || *u == ':') ? '?' : *u;
    out[k < n ? k : n - 1] = '\0';
}

/* Parses format_peer's field into e; false when it is malformed. */
static bool parse_peer(struct spool_entry *e, const char *field)
{
    if (strcmp(field, "-") == 0)
        return true;
    char *end;
    errno = 0;
    unsigned long uid = strtoul(field, &end, 10);
    if (errno || end == field || *end != ':' || uid > UINT32_MAX)
        return false;
    e->peer.uid = (uint32_t)uid;
    const char *p = end + 1;
    while (*p != ':') {
        unsigned long g = strtoul(p, &end, 10);
        if (end == p || g > UINT32_MAX || e->peer.nshared >= PEER_SHARED_MAX ||
            (*end != ',' && *end != ':'))
            return false;
        e->peer.shared[e->peer.nshared++] = (uint32_t)g;
        p = *end == ',' ? end + 1 : end;
    }
    snprintf(e->user, sizeof e->user, "%s", p + 1);
    e->has_peer = true;
    return true;
}

/* The .meta record, written whole and durable: what the upload needs after a restart. */
static int write_record(const struct spool *s, const struct spool_entry *e, char *msg,
                        size_t msglen)
{
    char meta[4200], part[4200], line[SPOOL_LINE_MAX], peer[256];
    spool_file(s, e->id, ".meta", meta, sizeof meta);
    spool_file(s, e->id, ".meta.part", part, sizeof part);
    format_peer(e, peer, sizeof peer);
    /* One line; the path has no tab or newline (artifact path rules). */
    int n = snprintf(line, sizeof line, "%s\t%s\t%" PRIu64 "\t%s\t%s\t%s\n", e->id, e->run_id,
                     e->size, e->sha256, peer, e->path);
    int rc = 0;
    int mf = open(part, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (mf < 0)
        rc = -errno;
    else if ((rc = util_write_full(mf, line, (size_t)n)) == 0 && fsync(mf) != 0)
        rc = -errno;
    if (mf >= 0)
        close(mf);
    if (rc != 0)
        return util_errorf(msg, msglen, rc, "cannot write %s", part);
    if (rename(part, meta) != 0)
        return util_errorf(msg, msglen, -errno, "cannot rename %s", part);
    if ((rc = util_fsync_dir(s->dir)) != 0)
        return util_errorf(msg, msglen, rc, "cannot fsync %s", s->dir);
    return 0;
}

int spool_copy(const struct spool *s, struct spool_entry *e, int fd,
               const struct proto_file_seen *seen, char *msg, size_t msglen)
{
    char part[4200], data[4200];
    spool_file(s, e->id, ".part", part, sizeof part);
    spool_file(s, e->id, ".data", data, sizeof data);
    uint8_t *buf = malloc(COPY_BUF);
    int out = open(part, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int rc;
    if (buf == NULL || out < 0)
        rc = util_errorf(msg, msglen, buf ? -errno : -ENOMEM, "cannot create %s", part);
    else if ((rc = copy_and_hash(s, e, fd, out, buf, msg, msglen)) == 0 &&
             (rc = check_unchanged(e, fd, seen, msg, msglen)) == 0 && fsync(out) != 0)
        rc = util_errorf(msg, msglen, -errno, "cannot fsync %s", part);
    if (out >= 0)
        close(out);
    free(buf);
    if (rc == 0 && rename(part, data) != 0)
        rc = util_errorf(msg, msglen, -errno, "cannot rename %s", part);
    if (rc == 0)
        rc = write_record(s, e, msg, msglen);
    if (rc != 0) {
        char meta[4200], metapart[4200];
        spool_file(s, e->id, ".meta", meta, sizeof meta);
        spool_file(s, e->id, ".meta.part", metapart, sizeof metapart);
        unlink(part);
        unlink(data);
        unlink(metapart);
        unlink(meta);
    }
    return rc;
}

int spool_copy_out(const struct spool *s, const char *id, int out, uint64_t size, char *msg,
                   size_t msglen)
{
    char data[4200];
    spool_file(s, id, ".data", data, sizeof data);
    int in = open(data, O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return util_errorf(msg, msglen, -errno, "cannot open the spool copy %s", data);
    uint64_t done = 0, started = 0;
    struct pace pc = {0, 0, 0};
    bool plain = false;
    int rc = 0;
    while (done < size && !plain) {
        uint64_t want = size - done < WRITEBACK_CHUNK ? size - done : WRITEBACK_CHUNK;
        ssize_t n = copy_file_range(in, NULL, out, NULL, want, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP ||
                      errno == EBADF)) {
            plain = true; /* another file system or kernel: copy through a buffer */
            break;
        }
        if (n <= 0) {
            rc = n < 0 ? -errno : -EIO; /* the spool file shrank */
            break;
        }
        done += (uint64_t)n;
        writeback(out, done, &started);
        pace(s, &pc, (uint64_t)n);
    }
    uint8_t *buf = plain ? malloc(COPY_BUF) : NULL;
    if (plain && buf == NULL)
        rc = -ENOMEM;
    while (buf && rc == 0 && done < size) {
        ssize_t n = pread(in, buf, COPY_BUF, (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            rc = n < 0 ? -errno : -EIO;
        else if ((rc = util_write_full(out, buf, (size_t)n)) == 0) {
            done += (uint64_t)n;
            writeback(out, done, &started);
            pace(s, &pc, (uint64_t)n);
        }
    }
    free(buf);
    close(in);
    return rc;
}

int spool_remove(const struct spool *s, const char *id, char *msg, size_t msglen)
{
    const char *exts[] = {".meta", ".data"}; /* the record first: no record names a lost copy */
    int rc = 0;
    for (size_t i = 0; i < 2; i++) {
        char path[4200];
        spool_file(s, id, exts[i], path, sizeof path);
        if (unlink(path) != 0 && errno != ENOENT && rc == 0)
            rc = util_errorf(msg, msglen, -errno, "cannot delete %s", path);
    }
    return rc;
}

/* ---- recovery ------------------------------------------------------------------------- */

/* Reads one .meta file into e; false when it is not a whole, valid record. */
static bool read_record(const char *path, struct spool_entry *e)
{
    FILE *f = fopen(path, "r");
    char line[SPOOL_LINE_MAX];
    /* A line without its newline was cut short (or is not ours): never half a path. */
    bool ok = f && fgets(line, sizeof line, f) != NULL && strchr(line, '\n') != NULL;
    if (f)
        fclose(f);
    if (!ok)
        return false;
    /* id, run, size, sha256, [peer,] path: records older than peers have five fields. */
    char *fields[6], *save = NULL, *p = line;
    int k = 0;
    line[strcspn(line, "\n")] = '\0';
    while (k < 6 && (fields[k] = strtok_r(p, "\t", &save)) != NULL) {
        p = NULL;
        k++;
    }
    memset(e, 0, sizeof *e);
    if ((k != 5 && k != 6) || strlen(fields[0]) >= sizeof e->id ||
        strlen(fields[1]) != PROTO_RUN_ID_LEN || strlen(fields[3]) != 64 ||
        (k == 6 && !parse_peer(e, fields[4])))
        return false;
    snprintf(e->id, sizeof e->id, "%s", fields[0]);
    memcpy(e->run_id, fields[1], PROTO_RUN_ID_LEN);
    e->size = strtoull(fields[2], NULL, 10);
    memcpy(e->sha256, fields[3], 64);
    snprintf(e->path, sizeof e->path, "%s", fields[k - 1]);
    return true;
}

int spool_recover(const struct spool *s, int (*cb)(void *ctx, const struct spool_entry *e),
                  void *ctx)
{
    DIR *d = opendir(s->dir);
    if (d == NULL)
        return -errno;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", s->dir, de->d_name);
        if (len > 5 && strcmp(de->d_name + len - 5, ".part") == 0) {
            unlink(path); /* a snapshot cut short: its client was never acknowledged */
            continue;
        }
        if (len <= 5 || strcmp(de->d_name + len - 5, ".meta") != 0)
            continue;
        struct spool_entry e;
        if (!read_record(path, &e)) {
            log_warn("[artifacts] %s is not a valid spool record; left in place", path);
            continue;
        }
        int rc = cb(ctx, &e);
        if (rc < 0)
            break;
        n += rc == 0;
    }
    closedir(d);
    return n;
}
