/*
 * Artifact snapshots and uploads. Worker threads do all file I/O: a snapshot reads the
 * client's descriptor with pread (its file offset stays the client's), hashes with SHA-256
 * and writes the spool copy; an upload copies the spool file to a temporary name next to
 * the destination (copy_file_range where the kernel can), fsyncs and renames it into place,
 * so MLflow never lists a partial file. Artifacts are owned by the loop thread; a worker
 * touches only the one it was given.
 */
#define _GNU_SOURCE /* copy_file_range */
#include "artifacts.h"

#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "http.h"
#include "log.h"
#include "stats.h"
#include "util.h"

/* One spool record: id, run, size, sha256, peer (at most 256 bytes), path, tabs, newline. */
#define SPOOL_LINE_MAX (ARTIFACT_PATH_MAX + 512)
#define COPY_BUF (1024 * 1024)
#define WRITEBACK_CHUNK (8ull << 20)

static void start_uploads(struct artifacts *ar);

static void spool_name(const struct artifacts *ar, const char *id, const char *ext, char *out,
                       size_t n)
{
    snprintf(out, n, "%s/%s%s", ar->spool, id, ext);
}

static int fsync_dir_of(const char *path)
{
    char dir[4300];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == NULL)
        return 0;
    *slash = '\0';
    int fd = open(dir[0] ? dir : "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = fsync(fd) == 0 ? 0 : -errno;
    close(fd);
    return rc;
}

static int write_full(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return w < 0 ? -errno : -EIO;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Sets a->msg to "<what>: <strerror(-rc)>" and returns rc. */
__attribute__((format(printf, 3, 4))) static int fail(struct artifact *a, int rc, const char *fmt,
                                                      ...)
{
    char what[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    snprintf(a->msg, sizeof a->msg, "%s: %s", what, strerror(-rc));
    return rc;
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

/* ---- snapshot (worker thread) --------------------------------------------------- */

static int copy_and_hash(struct artifact *a, int out, uint8_t *buf)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (md == NULL || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(md);
        return fail(a, -ENOMEM, "%s", "cannot start SHA-256");
    }
    uint64_t off = 0, started = 0;
    int rc = 0;
    for (;;) {
        ssize_t n = pread(a->fd, buf, COPY_BUF, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = fail(a, -errno, "%s", "cannot read the client's file");
            break;
        }
        if (n == 0)
            break;
        EVP_DigestUpdate(md, buf, (size_t)n);
        if ((rc = write_full(out, buf, (size_t)n)) != 0) {
            fail(a, rc, "cannot write the spool copy in %s", a->ar->spool);
            break;
        }
        off += (uint64_t)n;
        writeback(out, off, &started);
    }
    uint8_t digest[32];
    unsigned len = 0;
    EVP_DigestFinal_ex(md, digest, &len);
    EVP_MD_CTX_free(md);
    for (unsigned i = 0; i < 32; i++)
        snprintf(a->sha256 + 2 * i, 3, "%02x", digest[i]);
    a->size = off;
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
static int check_unchanged(struct artifact *a)
{
    struct stat st;
    if (fstat(a->fd, &st) != 0)
        return fail(a, -errno, "%s", "cannot stat the client's file");
    const struct proto_file_seen *s = &a->seen;
    if ((uint64_t)st.st_size == a->size && a->size == s->size &&
        (s->mtime_ns == 0 || ts_ns(st.st_mtim) == s->mtime_ns))
        return 0;
    char then[96], now[96];
    describe_state(then, sizeof then, s->size, s->mtime_ns);
    describe_state(now, sizeof now, (uint64_t)st.st_size, ts_ns(st.st_mtim));
    snprintf(a->msg, sizeof a->msg,
             "the file changed after log_artifact (at the call: %s; when copied: %s), so nothing "
             "was stored: write each version to a new file, or flush before rewriting it",
             then, now);
    return -ESTALE;
}

/*
 * The spool record's peer field: "-" without one, else "uid:gid,gid:user" (the user name with
 * any tab, newline or ':' replaced by '?'; it is only ever compared with names that have none).
 */
static void format_peer(const struct artifact *a, char *out, size_t n)
{
    if (!a->has_peer) {
        snprintf(out, n, "-");
        return;
    }
    size_t k = (size_t)snprintf(out, n, "%" PRIu32 ":", a->peer.uid);
    for (int i = 0; i < a->peer.nshared && k < n; i++)
        k += (size_t)snprintf(out + k, n - k, "%s%" PRIu32, i ? "," : "", a->peer.shared[i]);
    if (k < n)
        k += (size_t)snprintf(out + k, n - k, ":");
    for (const char *u = a->user; *u && k + 1 < n; u++)
        out[k++] = (*u == '\t' || *u == '\n' || *u == ':') ? '?' : *u;
    out[k < n ? k : n - 1] = '\0';
}

/* Parses format_peer's field into a; false when it is malformed. */
static bool parse_peer(struct artifact *a, const char *field)
{
    if (strcmp(field, "-") == 0)
        return true;
    char *end;
    errno = 0;
    unsigned long uid = strtoul(field, &end, 10);
    if (errno || end == field || *end != ':' || uid > UINT32_MAX)
        return false;
    a->peer.uid = (uint32_t)uid;
    const char *p = end + 1;
    while (*p != ':') {
        unsigned long g = strtoul(p, &end, 10);
        if (end == p || g > UINT32_MAX || a->peer.nshared >= PEER_SHARED_MAX ||
            (*end != ',' && *end != ':'))
            return false;
        a->peer.shared[a->peer.nshared++] = (uint32_t)g;
        p = *end == ',' ? end + 1 : end;
    }
    snprintf(a->user, sizeof a->user, "%s", p + 1);
    a->has_peer = true;
    return true;
}

/* ---- a full spool ----------------------------------------------------------------- */

enum room { ROOM_NOW, ROOM_LATER, ROOM_NEVER };

/*
 * Room for a copy of size bytes, leaving the journal on the same file system its reserve:
 * ARTIFACTS_SPOOL_RESERVE, or an eighth of a smaller file system. ROOM_NEVER when not even
 * an empty file system would have it.
 */
static enum room spool_room(const struct artifacts *ar, uint64_t size)
{
    struct statvfs vfs;
    if (statvfs(ar->spool, &vfs) != 0)
        return ROOM_NOW; /* the copy itself will say */
    uint64_t total = (uint64_t)vfs.f_blocks * vfs.f_frsize;
    uint64_t reserve = total / 8 < ARTIFACTS_SPOOL_RESERVE ? total / 8 : ARTIFACTS_SPOOL_RESERVE;
    if (size + reserve > total)
        return ROOM_NEVER;
    return (uint64_t)vfs.f_bavail * vfs.f_frsize >= size + reserve ? ROOM_NOW : ROOM_LATER;
}

/*
 * Worker thread, before the copy: what the loop must not wait for (a stat of the client's file
 * may block on NFS or FUSE, statvfs and access on a busy disk). 0 to copy; else a->rc:
 * -EEXIST the spool holds it already (a resend after a restart), -EBADF not a regular file,
 * -EFBIG no room even in an empty spool, -ENOSPC no room now (it waits for some).
 */
static int snapshot_checks(struct artifact *a, const char *meta)
{
    if (access(meta, F_OK) == 0)
        return -EEXIST;
    /* Only regular files: a pipe or /dev/zero would never end or never start. */
    struct stat st;
    if (fstat(a->fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(a->msg, sizeof a->msg, "the descriptor is not a regular file");
        return -EBADF;
    }
    a->size = (uint64_t)st.st_size; /* until the copy says how much it took */
    /* The spool copy must fit, with room to spare for the journal on the same disk. */
    switch (spool_room(a->ar, a->size)) {
    case ROOM_NEVER:
        snprintf(a->msg, sizeof a->msg,
                 "the agent's spool has no room for it even when empty (its file system's "
                 "size, less the room kept for the journal)");
        return -EFBIG;
    case ROOM_LATER: return -ENOSPC;
    case ROOM_NOW: break;
    }
    return 0;
}

static void snapshot_work(uv_work_t *w)
{
    struct artifact *a = w->data;
    char part[4200], data[4200], meta[4200], metapart[4200];
    spool_name(a->ar, a->id, ".part", part, sizeof part);
    spool_name(a->ar, a->id, ".data", data, sizeof data);
    spool_name(a->ar, a->id, ".meta", meta, sizeof meta);
    spool_name(a->ar, a->id, ".meta.part", metapart, sizeof metapart);
    a->msg[0] = '\0';
    if ((a->rc = snapshot_checks(a, meta)) != 0) {
        if (a->rc != -ENOSPC) {
            close(a->fd);
            a->fd = -1;
        }
        return;
    }
    uint8_t *buf = malloc(COPY_BUF);
    int out = open(part, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (buf == NULL || out < 0) {
        a->rc = fail(a, buf ? -errno : -ENOMEM, "cannot create %s", part);
    } else if ((a->rc = copy_and_hash(a, out, buf)) == 0 && (a->rc = check_unchanged(a)) == 0) {
        if (fsync(out) != 0)
            a->rc = fail(a, -errno, "cannot fsync %s", part);
    }
    if (out >= 0)
        close(out);
    free(buf);
    if (a->rc != -ENOSPC && a->rc != -EDQUOT) {
        close(a->fd); /* kept to copy again once the disk has room */
        a->fd = -1;
    }
    if (a->rc == 0 && rename(part, data) != 0)
        a->rc = fail(a, -errno, "cannot rename %s", part);
    if (a->rc == 0) {
        /* One line: what the upload needs after a restart. The path has no tab or newline. */
        char line[SPOOL_LINE_MAX], peer[256];
        format_peer(a, peer, sizeof peer);
        int n = snprintf(line, sizeof line, "%s\t%s\t%" PRIu64 "\t%s\t%s\t%s\n", a->id, a->run_id,
                         a->size, a->sha256, peer, a->path);
        int mf = open(metapart, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (mf < 0 || write_full(mf, line, (size_t)n) != 0 || fsync(mf) != 0)
            a->rc = fail(a, -(errno ? errno : EIO), "cannot write %s", metapart);
        if (mf >= 0)
            close(mf);
        if (a->rc == 0 && rename(metapart, meta) != 0)
            a->rc = fail(a, -errno, "cannot rename %s", metapart);
        if (a->rc == 0 && fsync_dir_of(meta) != 0)
            a->rc = fail(a, -EIO, "cannot fsync %s", a->ar->spool);
    }
    if (a->rc != 0) {
        unlink(part);
        unlink(data);
        unlink(metapart);
        unlink(meta);
    }
}

static void free_artifact(struct artifact *a)
{
    if (a->fd >= 0)
        close(a->fd);
    free(a->store_uri);
    free(a->store_root);
    free(a);
}

static void unlink_live(struct artifacts *ar, struct artifact *a)
{
    for (struct artifact **p = &ar->live; *p; p = &(*p)->next) {
        if (*p == a) {
            *p = a->next;
            ar->nlive--;
            break;
        }
    }
}

static void snapshot_done(uv_work_t *w, int status);

static int start_snapshot(struct artifacts *ar, struct artifact *a)
{
    a->work.data = a;
    a->uploading = true; /* a worker owns it */
    if (uv_queue_work(ar->loop, &a->work, snapshot_work, snapshot_done) != 0) {
        a->uploading = false;
        return -EAGAIN;
    }
    return 0;
}

static void space_cb(uv_timer_t *t);

/*
 * No room in the spool (a full disk, a quota): the snapshot waits, holding the client's
 * descriptor, and so does its connection, whose later frames stay unread. Tried again after
 * 100 ms doubling to 5 s (jittered); the first one that fits resumes the rest, in order. An
 * artifact that had waited before keeps its place at the head (again: the worker found no room).
 */
static void wait_for_space(struct artifacts *ar, struct artifact *a)
{
    if (ar->space_wait == NULL && ar->space_failures == 0)
        stats.artifact_spool_full++;
    if (a->waited) {
        a->qnext = ar->space_wait;
        ar->space_wait = a;
    } else {
        a->qnext = NULL;
        struct artifact **p = &ar->space_wait;
        while (*p)
            p = &(*p)->qnext;
        *p = a; /* first come, first copied */
        a->waited = true;
    }
    if (uv_is_active((uv_handle_t *)&ar->space_timer))
        return;
    uint64_t ms = util_backoff_ms(ar->space_failures + 1, ARTIFACTS_SPACE_RETRY_MIN_MS,
                                  ARTIFACTS_SPACE_RETRY_MAX_MS, (uint32_t)rand());
    ar->space_failures++;
    char size[48] = "";
    if (a->size) /* known once a worker has looked at the file */
        snprintf(size, sizeof size, " (%" PRIu64 " bytes)", a->size);
    log_limited(LOG_ERROR,
                "[artifacts] the spool %s has no room for %s%s and room to spare for the "
                "journal: free space there; its client waits, trying again in %" PRIu64 " ms",
                ar->spool, a->path, size, ms);
    uv_timer_start(&ar->space_timer, space_cb, ms, 0);
}

/* Tries the first waiting snapshot again; its worker looks for room before it copies. */
static void resume_waiting(struct artifacts *ar)
{
    struct artifact *a = ar->space_wait;
    if (a == NULL)
        return;
    ar->space_wait = a->qnext;
    a->qnext = NULL;
    if (start_snapshot(ar, a) != 0)
        wait_for_space(ar, a);
}

static void space_cb(uv_timer_t *t)
{
    resume_waiting(t->data);
}

static void snapshot_done(uv_work_t *w, int status)
{
    struct artifact *a = w->data;
    struct artifacts *ar = a->ar;
    bool waited = a->waited;
    a->uploading = false;
    if (status != 0 && a->rc == 0) {
        a->rc = status;
        snprintf(a->msg, sizeof a->msg, "snapshot cancelled");
    }
    if (ar->closing) {
        unlink_live(ar, a);
        free_artifact(a);
        return;
    }
    if (a->rc == -ENOSPC || a->rc == -EDQUOT) {
        /* The disk filled during the copy: the partial copy is gone, the descriptor kept. */
        a->rc = 0;
        wait_for_space(ar, a);
        return;
    }
    if (a->rc != 0) {
        if (a->rc == -ESTALE)
            stats.artifacts_changed++;
        if (a->rc != -EEXIST)
            log_limited(LOG_WARN, "[artifacts] %s (%s): %s", a->id, a->path, a->msg);
        unlink_live(ar, a);
        ar->cbs.snapshotted(ar->ctx, a, a->rc, a->msg);
        free_artifact(a);
    } else {
        stats.artifacts_received++;
        stats.artifacts_pending = ar->nlive;
        ar->cbs.snapshotted(ar->ctx, a, 0, "");
    }
    if (waited) {
        /* The head of the queue is done with: the next one goes. */
        if (ar->space_wait == NULL && ar->space_failures) {
            log_info("[artifacts] the spool has room again after %u attempt(s)",
                     ar->space_failures);
            ar->space_failures = 0;
        }
        resume_waiting(ar);
    }
}

/* ---- upload (worker thread) ----------------------------------------------------- */

static int copy_file(int in, int out, uint64_t size)
{
    uint64_t done = 0, started = 0;
    bool plain = false;
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
        if (n <= 0)
            return n < 0 ? -errno : -EIO; /* the spool file shrank */
        done += (uint64_t)n;
        writeback(out, done, &started);
    }
    if (!plain)
        return 0;
    uint8_t *buf = malloc(COPY_BUF);
    if (buf == NULL)
        return -ENOMEM;
    int rc = 0;
    while (rc == 0 && done < size) {
        ssize_t n = pread(in, buf, COPY_BUF, (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            rc = n < 0 ? -errno : -EIO;
        else if ((rc = write_full(out, buf, (size_t)n)) == 0) {
            done += (uint64_t)n;
            writeback(out, done, &started);
        }
    }
    free(buf);
    return rc;
}

/* Local paths and file:// URIs (NFS included): temporary name, fsync, rename. */
/*
 * Writes the spool copy to root/rel without following a symbolic link anywhere below root:
 * each directory of rel is made (0755) and opened with O_NOFOLLOW from the one above it, and
 * the file is written to a temporary name in the last one, fsynced and renamed into place
 * there (a link at the final name is replaced, never followed). On a shared artifact root a
 * user who plants a link in a run's directory gets a failed upload, not a file written
 * wherever the link points.
 */
static int upload_local(struct artifact *a, const char *root, const char *rel)
{
    char dirs[ARTIFACT_PATH_MAX + 4200], tmp[300], data[4200];
    spool_name(a->ar, a->id, ".data", data, sizeof data);
    int dfd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    /* An artifact root the operator named is trusted: made (0755) if missing. */
    if (dfd < 0 && errno == ENOENT && util_mkdir_p(root, 0755, 0755) == 0)
        dfd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return fail(a, -errno, "cannot open the artifact root %s", root);
    snprintf(dirs, sizeof dirs, "%s", rel);
    char *name = dirs;
    int rc = 0;
    for (char *slash; (slash = strchr(name, '/')) != NULL; name = slash + 1) {
        *slash = '\0';
        if (mkdirat(dfd, name, 0755) != 0 && errno != EEXIST) {
            rc = fail(a, -errno, "cannot create %s/%s", root, dirs);
            break;
        }
        int next = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (next < 0) {
            int e = errno;
            if (e == ELOOP || e == ENOTDIR)
                snprintf(a->msg, sizeof a->msg,
                         "%.120s/%.120s is a symbolic link or not a directory: trackd writes "
                         "below %.120s without following links; remove it",
                         root, dirs, root);
            else
                fail(a, -e, "cannot open %s/%s", root, dirs);
            rc = -e;
            break;
        }
        close(dfd);
        dfd = next;
        *slash = '/';
    }
    if (rc != 0) {
        close(dfd);
        return rc;
    }
    if ((size_t)snprintf(tmp, sizeof tmp, ".%s.trackd-%s.tmp", name, a->id) >= sizeof tmp) {
        close(dfd);
        return fail(a, -ENAMETOOLONG, "file name %s", name);
    }
    unlinkat(dfd, tmp, 0); /* left by an upload a crash cut short */
    int in = open(data, O_RDONLY | O_CLOEXEC);
    int out =
        in < 0 ? -1 : openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (in < 0)
        rc = fail(a, -errno, "cannot open the spool copy %s", data);
    else if (out < 0)
        rc = fail(a, -errno, "cannot create %s in %s/%s", tmp, root, dirs);
    else if ((rc = copy_file(in, out, a->size)) != 0)
        fail(a, rc, "cannot write %s/%s", root, rel);
    else if (fsync(out) != 0)
        rc = fail(a, -errno, "cannot fsync %s/%s", root, rel);
    if (in >= 0)
        close(in);
    if (out >= 0)
        close(out);
    if (rc == 0 && renameat(dfd, tmp, dfd, name) != 0)
        rc = fail(a, -errno, "cannot rename into %s/%s", root, rel);
    if (rc == 0 && fsync(dfd) != 0)
        rc = fail(a, -errno, "cannot fsync the directory of %s/%s", root, rel);
    if (rc != 0)
        unlinkat(dfd, tmp, 0);
    close(dfd);
    return rc;
}

/* Appends path to url with every segment percent-encoded ('/' kept). */
static int append_escaped(CURL *h, char *url, size_t cap, const char *path)
{
    size_t len = strlen(url);
    while (*path) {
        size_t n = strcspn(path, "/");
        char *e = curl_easy_escape(h, path, (int)n);
        if (e == NULL)
            return -ENOMEM;
        int w = snprintf(url + len, cap - len, "%s%s", e, path[n] ? "/" : "");
        curl_free(e);
        if (w < 0 || (size_t)w >= cap - len)
            return -ENAMETOOLONG;
        len += (size_t)w;
        path += n + (path[n] ? 1 : 0);
    }
    return 0;
}

/* HTTP PUT of the spool copy, streamed from the file: memory stays flat whatever its size. */
static int upload_put(struct artifact *a, CURL *h, const char *url)
{
    char data[4200], err[CURL_ERROR_SIZE];
    spool_name(a->ar, a->id, ".data", data, sizeof data);
    FILE *f = fopen(data, "rb");
    if (f == NULL)
        return fail(a, -errno, "cannot open the spool copy %s", data);
    struct curl_slist *hdr = curl_slist_append(NULL, "Content-Type: application/octet-stream");
    http_prepare(h, url, hdr, err);
    curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(h, CURLOPT_READDATA, f);
    curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)a->size);
    CURLcode cc = curl_easy_perform(h);
    long code = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    curl_slist_free_all(hdr);
    fclose(f);
    if (cc != CURLE_OK) {
        snprintf(a->msg, sizeof a->msg, "PUT %.200s: %.200s", url,
                 err[0] ? err : curl_easy_strerror(cc));
        return http_transfer_error(cc);
    }
    int rc = http_status_error(code);
    if (rc != 0)
        snprintf(a->msg, sizeof a->msg, "PUT %.300s: HTTP %ld", url, code);
    return rc;
}

/* mlflow-artifacts:/path (the configured server) or mlflow-artifacts://host:port/path. */
static int upload_mlflow(struct artifact *a, const char *uri)
{
    const char *rest = uri + strlen("mlflow-artifacts:");
    char url[8192];
    if (strncmp(rest, "//", 2) == 0) {
        size_t host = strcspn(rest + 2, "/");
        snprintf(url, sizeof url, "http://%.*s", (int)host, rest + 2);
        rest += 2 + host;
    } else if (a->ar->mlflow_server[0]) {
        snprintf(url, sizeof url, "%s", a->ar->mlflow_server);
    } else {
        snprintf(a->msg, sizeof a->msg,
                 "%.300s names no server: set [artifacts] mlflow_server_url to the MLflow server "
                 "that serves artifacts",
                 uri);
        return -EDESTADDRREQ;
    }
    while (*rest == '/')
        rest++;
    size_t ul = strlen(url);
    snprintf(url + ul, sizeof url - ul, "/api/2.0/mlflow-artifacts/artifacts/");
    CURL *h = curl_easy_init();
    if (h == NULL)
        return fail(a, -ENOMEM, "%s", "cannot start libcurl");
    int rc = append_escaped(h, url, sizeof url, rest);
    if (rc != 0)
        fail(a, rc, "URL for %.300s", uri);
    else
        rc = upload_put(a, h, url);
    curl_easy_cleanup(h);
    return rc;
}

static void upload_work(uv_work_t *w)
{
    struct artifact *a = w->data;
    const char *uri = a->store_uri;
    a->rc = 0;
    if (a->store_root) {
        a->rc = upload_local(a, a->store_root, a->store_below);
        return;
    }
    if (uri[0] == '/' || strncmp(uri, "file://", 7) == 0) {
        a->rc = fail(a, -EPERM, "local destination %s is below no allowed artifact root", uri);
        return;
    }
    if (strncmp(uri, "mlflow-artifacts:", 17) == 0) {
        a->rc = upload_mlflow(a, uri);
        return;
    }
    if (strncmp(uri, "s3://", 5) == 0) {
        char bucket[256], data[4200];
        size_t bl = strcspn(uri + 5, "/");
        if (bl == 0 || bl >= sizeof bucket || uri[5 + bl] != '/') {
            snprintf(a->msg, sizeof a->msg, "malformed S3 URI %.300s", uri);
            a->rc = -EINVAL;
            return;
        }
        snprintf(bucket, sizeof bucket, "%.*s", (int)bl, uri + 5);
        spool_name(a->ar, a->id, ".data", data, sizeof data);
        a->rc = s3_upload(&a->ar->s3, bucket, uri + 5 + bl + 1, data, a->size, a->sha256, a->msg,
                          sizeof a->msg);
        return;
    }
    snprintf(a->msg, sizeof a->msg,
             "artifact store %.300s is not supported by this agent (local paths, file://, "
             "mlflow-artifacts: and s3:// are)",
             a->store_uri);
    a->rc = -EPROTONOSUPPORT;
}

/* Errors of a store that is down or full, as opposed to a file that cannot go there. */
static bool retryable(int rc)
{
    switch (-rc) {
    case EIO:
    case ETIMEDOUT:
    case ESTALE:
    case ENOSPC:
    case EDQUOT:
    case EAGAIN:
    case ECONNREFUSED:
    case ECONNRESET:
    case ECONNABORTED:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case ENOTCONN:
    case EPIPE: return true;
    default: return false;
    }
}

static void retry_cb(uv_timer_t *t);

static void schedule_retry(struct artifacts *ar, struct artifact *a)
{
    uint64_t ms = util_backoff_ms(a->attempts, ARTIFACTS_RETRY_MIN_MS, ARTIFACTS_RETRY_MAX_MS,
                                  (uint32_t)rand());
    a->retry_at = uv_now(ar->loop) + ms;
    a->qnext = ar->retry;
    ar->retry = a;
    if (!uv_is_active((uv_handle_t *)&ar->retry_timer))
        uv_timer_start(&ar->retry_timer, retry_cb, 250, 250);
}

static void retry_cb(uv_timer_t *t)
{
    struct artifacts *ar = t->data;
    uint64_t now = uv_now(ar->loop);
    struct artifact **p = &ar->retry;
    while (*p) {
        struct artifact *a = *p;
        if (a->retry_at > now) {
            p = &a->qnext;
            continue;
        }
        *p = a->qnext;
        a->qnext = NULL;
        if (ar->qtail)
            ar->qtail->qnext = a;
        else
            ar->qhead = a;
        ar->qtail = a;
    }
    if (ar->retry == NULL)
        uv_timer_stop(&ar->retry_timer);
    start_uploads(ar);
}

static void upload_done(uv_work_t *w, int status)
{
    struct artifact *a = w->data;
    struct artifacts *ar = a->ar;
    ar->running--;
    a->uploading = false;
    if (status != 0 && a->rc == 0) {
        a->rc = status;
        snprintf(a->msg, sizeof a->msg, "upload cancelled");
    }
    if (ar->closing) {
        unlink_live(ar, a);
        free_artifact(a);
        return;
    }
    if (a->rc == 0) {
        stats.artifacts_uploaded++;
        stats.artifact_bytes_uploaded += a->size;
        log_debug("[artifacts] %s uploaded to %s (%" PRIu64 " bytes)", a->id, a->store_uri,
                  a->size);
    } else if (retryable(a->rc) && a->attempts < ARTIFACTS_MAX_ATTEMPTS) {
        stats.artifact_retries++;
        log_limited(LOG_WARN, "[artifacts] upload of %s (%s) failed: %s; retrying (attempt %u)",
                    a->id, a->path, a->msg, a->attempts + 1);
        schedule_retry(ar, a);
        start_uploads(ar);
        return;
    } else {
        stats.artifacts_failed++;
        log_limited(LOG_WARN,
                    "[artifacts] upload of %s (%s) failed for good after %u attempt(s): %s", a->id,
                    a->path, a->attempts, a->msg);
    }
    ar->cbs.uploaded(ar->ctx, a, a->rc, a->msg);
    start_uploads(ar);
}

static void start_uploads(struct artifacts *ar)
{
    while (!ar->closing && ar->qhead && ar->running < ARTIFACTS_MAX_UPLOADS) {
        struct artifact *a = ar->qhead;
        ar->qhead = a->qnext;
        if (ar->qhead == NULL)
            ar->qtail = NULL;
        a->qnext = NULL;
        a->work.data = a;
        a->uploading = true;
        a->attempts++;
        if (uv_queue_work(ar->loop, &a->work, upload_work, upload_done) != 0) {
            a->uploading = false;
            snprintf(a->msg, sizeof a->msg, "cannot start a worker");
            ar->cbs.uploaded(ar->ctx, a, -EAGAIN, a->msg);
            continue;
        }
        ar->running++;
    }
}

/* ---- public --------------------------------------------------------------------- */

int artifacts_init(struct artifacts *ar, uv_loop_t *loop, const char *journal_dir,
                   const char *mlflow_server, const struct s3_config *s3,
                   const struct artifacts_cbs *cbs, void *ctx, char *msg, size_t msglen)
{
    memset(ar, 0, sizeof *ar);
    if (s3)
        ar->s3 = *s3;
    snprintf(ar->mlflow_server, sizeof ar->mlflow_server, "%s", mlflow_server ? mlflow_server : "");
    size_t sl = strlen(ar->mlflow_server);
    while (sl > 0 && ar->mlflow_server[sl - 1] == '/')
        ar->mlflow_server[--sl] = '\0';
    ar->loop = loop;
    ar->cbs = *cbs;
    ar->ctx = ctx;
    if ((size_t)snprintf(ar->spool, sizeof ar->spool, "%s/artifacts", journal_dir) >=
        sizeof ar->spool) {
        snprintf(msg, msglen, "journal directory name too long");
        return -ENAMETOOLONG;
    }
    if (mkdir(ar->spool, 0700) != 0 && errno != EEXIST) {
        int e = errno;
        snprintf(msg, msglen, "cannot create the artifact spool %s: %s", ar->spool, strerror(e));
        return -e;
    }
    uv_timer_init(loop, &ar->retry_timer);
    uv_timer_init(loop, &ar->space_timer);
    ar->retry_timer.data = ar->space_timer.data = ar;
    return 0;
}

const char *artifacts_path_problem(const char *path, size_t len)
{
    if (len == 0)
        return "the artifact path is empty";
    if (len > ARTIFACT_PATH_MAX)
        return "the artifact path is longer than 1024 bytes";
    if (path[0] == '/')
        return "the artifact path must be relative to the run's artifact root";
    size_t seg = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || path[i] == '/') {
            const char *s = path + seg;
            size_t n = i - seg;
            if (n == 0)
                return "the artifact path has an empty segment ('//' or a trailing '/')";
            if ((n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.'))
                return "the artifact path may not contain '.' or '..' segments";
            seg = i + 1;
        } else if ((unsigned char)path[i] < 0x20 || path[i] == 0x7f) {
            return "the artifact path contains a control character";
        }
    }
    return NULL;
}

struct artifact *artifacts_find(struct artifacts *ar, const char *id)
{
    for (struct artifact *a = ar->live; a; a = a->next)
        if (strcmp(a->id, id) == 0)
            return a;
    return NULL;
}

static struct artifact *new_artifact(struct artifacts *ar, const char *id)
{
    struct artifact *a = calloc(1, sizeof *a);
    if (a == NULL)
        return NULL;
    a->ar = ar;
    a->fd = -1;
    snprintf(a->id, sizeof a->id, "%s", id);
    a->next = ar->live;
    ar->live = a;
    ar->nlive++;
    return a;
}

/* Artifacts held for uid: bounded per user so that one cannot take every slot. */
static size_t live_of_uid(const struct artifacts *ar, uint32_t uid)
{
    size_t n = 0;
    for (const struct artifact *a = ar->live; a; a = a->next)
        n += a->has_peer && a->peer.uid == uid;
    return n;
}

int artifacts_snapshot(struct artifacts *ar, const struct artifact_origin *o, const char *run_id,
                       struct proto_str path, const struct proto_file_seen *seen, int fd,
                       struct artifact **out)
{
    char id[40];
    snprintf(id, sizeof id, "%016" PRIx64 "-%016" PRIx64, o->session, o->seq);
    if (artifacts_find(ar, id) != NULL) {
        close(fd);
        return -EEXIST;
    }
    if (ar->closing || ar->nlive >= ARTIFACTS_MAX_LIVE) {
        close(fd);
        return -ENOBUFS;
    }
    if (o->peer && live_of_uid(ar, o->peer->uid) >= ARTIFACTS_MAX_LIVE_PER_UID) {
        close(fd);
        return -EDQUOT;
    }
    struct artifact *a = new_artifact(ar, id);
    if (a == NULL) {
        close(fd);
        return -ENOMEM;
    }
    a->conn_id = o->conn_id;
    a->seq = o->seq;
    if (o->peer) {
        a->has_peer = true;
        a->peer = *o->peer;
        snprintf(a->user, sizeof a->user, "%s", o->user ? o->user : "");
    }
    a->fd = fd;
    a->seen = *seen;
    memcpy(a->run_id, run_id, PROTO_RUN_ID_LEN);
    snprintf(a->path, sizeof a->path, "%.*s", (int)path.len, path.ptr);
    *out = a;
    /* Everything that touches a disk (is it spooled already? a regular file? room for it?)
     * is the worker's: snapshot_checks. Behind others that wait for room, it waits too. */
    if (ar->space_wait != NULL) {
        wait_for_space(ar, a);
        return 0;
    }
    if (start_snapshot(ar, a) != 0) {
        unlink_live(ar, a);
        free_artifact(a);
        return -EAGAIN;
    }
    return 0;
}

void artifacts_upload(struct artifacts *ar, struct artifact *a, const char *store_uri,
                      const char *local_root, const char *below)
{
    free(a->store_uri);
    free(a->store_root);
    a->store_uri = strdup(store_uri);
    a->store_root = local_root ? strdup(local_root) : NULL;
    a->store_below = NULL;
    if (a->store_root && a->store_uri)
        a->store_below = a->store_uri + (below - store_uri);
    if (a->store_uri == NULL || (local_root && a->store_root == NULL)) {
        snprintf(a->msg, sizeof a->msg, "out of memory");
        ar->cbs.uploaded(ar->ctx, a, -ENOMEM, a->msg);
        return;
    }
    if (ar->qtail)
        ar->qtail->qnext = a;
    else
        ar->qhead = a;
    ar->qtail = a;
    start_uploads(ar);
}

/* Worker thread: the spool copy's two files. */
static void forget_work(uv_work_t *w)
{
    struct artifact *a = w->data;
    const char *exts[] = {".meta", ".data"};
    a->rc = 0;
    for (size_t i = 0; i < 2; i++) {
        char path[4200];
        spool_name(a->ar, a->id, exts[i], path, sizeof path);
        if (unlink(path) != 0 && errno != ENOENT && a->rc == 0) {
            a->rc = -errno;
            snprintf(a->msg, sizeof a->msg, "%.500s", path);
        }
    }
}

static void forget_done(uv_work_t *w, int status)
{
    struct artifact *a = w->data;
    if (status == 0 && a->rc != 0)
        log_limited(LOG_WARN, "[artifacts] cannot delete %s: %s", a->msg, strerror(-a->rc));
    free_artifact(a);
}

void artifacts_forget(struct artifacts *ar, struct artifact *a)
{
    if (a->uploading)
        return; /* a worker holds it: a resend recorded it meanwhile; its end frees it */
    for (struct artifact **p = &ar->qhead; *p; p = &(*p)->qnext) {
        if (*p == a) {
            *p = a->qnext;
            if (ar->qtail == a)
                ar->qtail = NULL;
            break;
        }
    }
    if (ar->qtail == NULL)
        for (struct artifact *q = ar->qhead; q; q = q->qnext)
            ar->qtail = q;
    for (struct artifact **p = &ar->retry; *p; p = &(*p)->qnext) {
        if (*p == a) {
            *p = a->qnext;
            break;
        }
    }
    /* Gone for everyone at once (no lookup finds it, no upload takes it); deleting a large
     * file takes the file system a while, so a worker does that. */
    unlink_live(ar, a);
    stats.artifacts_pending = ar->nlive;
    a->uploading = true;
    a->work.data = a;
    if (uv_queue_work(ar->loop, &a->work, forget_work, forget_done) != 0) {
        forget_work(&a->work);
        forget_done(&a->work, 0);
    }
}

int artifacts_recover(struct artifacts *ar, void (*cb)(void *ctx, struct artifact *a), void *ctx)
{
    DIR *d = opendir(ar->spool);
    if (d == NULL)
        return -errno;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", ar->spool, e->d_name);
        if (len > 5 && strcmp(e->d_name + len - 5, ".part") == 0) {
            unlink(path); /* a snapshot cut short: its client was never acknowledged */
            continue;
        }
        if (len <= 5 || strcmp(e->d_name + len - 5, ".meta") != 0)
            continue;
        FILE *f = fopen(path, "r");
        char line[SPOOL_LINE_MAX];
        /* A line without its newline was cut short (or is not ours): never half a path. */
        bool ok = f && fgets(line, sizeof line, f) != NULL && strchr(line, '\n') != NULL;
        if (f)
            fclose(f);
        /* id, run, size, sha256, [peer,] path: records older than peers have five fields. */
        char *fields[6], *save = NULL, *p = line;
        int k = 0;
        line[ok ? strcspn(line, "\n") : 0] = '\0';
        while (ok && k < 6 && (fields[k] = strtok_r(p, "\t", &save)) != NULL) {
            p = NULL;
            k++;
        }
        struct artifact probe = {0};
        if ((k != 5 && k != 6) || strlen(fields[1]) != PROTO_RUN_ID_LEN ||
            strlen(fields[3]) != 64 || (k == 6 && !parse_peer(&probe, fields[4])) ||
            artifacts_find(ar, fields[0]) != NULL) {
            log_warn("[artifacts] %s is not a valid spool record; left in place", path);
            continue;
        }
        struct artifact *a = new_artifact(ar, fields[0]);
        if (a == NULL)
            break;
        memcpy(a->run_id, fields[1], PROTO_RUN_ID_LEN);
        a->size = strtoull(fields[2], NULL, 10);
        memcpy(a->sha256, fields[3], 64);
        a->has_peer = probe.has_peer;
        a->peer = probe.peer;
        memcpy(a->user, probe.user, sizeof a->user);
        snprintf(a->path, sizeof a->path, "%s", fields[k - 1]);
        stats.artifacts_pending = ar->nlive;
        cb(ctx, a);
        n++;
    }
    closedir(d);
    return n;
}

static void timer_closed(uv_handle_t *h)
{
    struct artifacts *ar = h->data;
    if (!uv_is_closing((uv_handle_t *)&ar->space_timer)) {
        uv_close((uv_handle_t *)&ar->space_timer, timer_closed);
        return;
    }
    if (ar->closed)
        ar->closed(ar);
}

void artifacts_close(struct artifacts *ar, void (*closed)(struct artifacts *))
{
    ar->closing = true;
    ar->closed = closed;
    ar->qhead = ar->qtail = ar->retry = ar->space_wait = NULL;
    uv_timer_stop(&ar->retry_timer);
    uv_timer_stop(&ar->space_timer);
    uv_close((uv_handle_t *)&ar->retry_timer, timer_closed);
    struct artifact *a = ar->live, *next;
    for (; a; a = next) {
        next = a->next;
        if (!a->uploading) {
            unlink_live(ar, a);
            free_artifact(a);
        }
    }
}
