/*
 * Upload transports (transports.h): the local copy, the HTTP PUT to an MLflow server and the
 * hand-off to s3.c. Each streams the spool copy: memory stays flat whatever its size.
 */
#include "transports.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "http.h"
#include "util.h"

void transports_init(struct transports *t, const char *mlflow_server, const struct s3_config *s3)
{
    memset(t, 0, sizeof *t);
    if (s3)
        t->s3 = *s3;
    snprintf(t->mlflow_server, sizeof t->mlflow_server, "%s", mlflow_server ? mlflow_server : "");
    size_t n = strlen(t->mlflow_server);
    while (n > 0 && t->mlflow_server[n - 1] == '/')
        t->mlflow_server[--n] = '\0';
}

/* ---- local paths and file:// URIs (NFS included) --------------------------------------- */

/*
 * Opens root/<each directory of rel> (made 0755 when missing) from the one above it with
 * O_NOFOLLOW; *name is left at rel's last segment in dirs. A directory descriptor, or -errno
 * with msg: a symbolic link anywhere below root refuses the upload.
 */
static int open_below(const char *root, char *dirs, char **name, char *msg, size_t msglen)
{
    int dfd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    /* An artifact root the operator named is trusted: made (0755) if missing. */
    if (dfd < 0 && errno == ENOENT && util_mkdir_p(root, 0755, 0755) == 0)
        dfd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return util_errorf(msg, msglen, -errno, "cannot open the artifact root %s", root);
    *name = dirs;
    for (char *slash; (slash = strchr(*name, '/')) != NULL; *name = slash + 1) {
        *slash = '\0';
        int e = 0, next = -1;
        if (mkdirat(dfd, *name, 0755) != 0 && errno != EEXIST) {
            e = util_errorf(msg, msglen, -errno, "cannot create %s/%s", root, dirs);
        } else if ((next = openat(dfd, *name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)) <
                   0) {
            e = -errno;
            if (e == -ELOOP || e == -ENOTDIR)
                snprintf(msg, msglen,
                         "%.120s/%.120s is a symbolic link or not a directory: trackd writes "
                         "below %.120s without following links; remove it",
                         root, dirs, root);
            else
                util_errorf(msg, msglen, e, "cannot open %s/%s", root, dirs);
        }
        close(dfd);
        if (e != 0)
            return e;
        dfd = next;
        *slash = '/';
    }
    return dfd;
}

/*
 * Writes the spool copy to root/rel without following a symbolic link anywhere below root:
 * each directory of rel is made (0755) and opened with O_NOFOLLOW from the one above it, and
 * the file is written to a temporary name in the last one, fsynced and renamed into place
 * there (a link at the final name is replaced, never followed). On a shared artifact root a
 * user who plants a link in a run's directory gets a failed upload, not a file written
 * wherever the link points.
 */
static int put_local(const struct transport_put *p, char *msg, size_t msglen)
{
    const char *root = p->local_root, *rel = p->below;
    char dirs[ARTIFACT_PATH_MAX + 4200], tmp[300], *name = dirs;
    snprintf(dirs, sizeof dirs, "%s", rel);
    int dfd = open_below(root, dirs, &name, msg, msglen);
    if (dfd < 0)
        return dfd;
    if ((size_t)snprintf(tmp, sizeof tmp, ".%s.trackd-%s.tmp", name, p->e->id) >= sizeof tmp) {
        close(dfd);
        return util_errorf(msg, msglen, -ENAMETOOLONG, "file name %s", name);
    }
    unlinkat(dfd, tmp, 0); /* left by an upload a crash cut short */
    int rc = 0;
    int out = openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (out < 0) {
        rc = util_errorf(msg, msglen, -errno, "cannot create %s in %s/%s", tmp, root, dirs);
    } else {
        msg[0] = '\0'; /* spool_copy_out names the spool copy when that is what failed */
        rc = spool_copy_out(p->spool, p->e->id, out, p->e->size, msg, msglen);
        if (rc != 0 && msg[0] == '\0')
            util_errorf(msg, msglen, rc, "cannot write %s/%s", root, rel);
        else if (rc == 0 && fsync(out) != 0)
            rc = util_errorf(msg, msglen, -errno, "cannot fsync %s/%s", root, rel);
    }
    if (out >= 0)
        close(out);
    if (rc == 0 && renameat(dfd, tmp, dfd, name) != 0)
        rc = util_errorf(msg, msglen, -errno, "cannot rename into %s/%s", root, rel);
    if (rc == 0 && fsync(dfd) != 0)
        rc = util_errorf(msg, msglen, -errno, "cannot fsync the directory of %s/%s", root, rel);
    if (rc != 0)
        unlinkat(dfd, tmp, 0);
    close(dfd);
    return rc;
}

/* ---- mlflow-artifacts: ---------------------------------------------------------------- */

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

/* HTTP PUT of the spool copy, streamed from the file. */
static int put_http(const struct transport_put *p, CURL *h, const char *url, char *msg,
                    size_t msglen)
{
    char data[4200], err[CURL_ERROR_SIZE];
    spool_file(p->spool, p->e->id, ".data", data, sizeof data);
    FILE *f = fopen(data, "rb");
    if (f == NULL)
        return util_errorf(msg, msglen, -errno, "cannot open the spool copy %s", data);
    struct curl_slist *hdr = curl_slist_append(NULL, "Content-Type: application/octet-stream");
    http_prepare(h, url, hdr, err);
    curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(h, CURLOPT_READDATA, f);
    curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)p->e->size);
    long code;
    int rc = http_perform(h, "PUT", url, err, &code, msg, msglen);
    curl_slist_free_all(hdr);
    fclose(f);
    if (rc != 0)
        return rc;
    rc = http_status_error(code);
    if (rc != 0)
        snprintf(msg, msglen, "PUT %.300s: HTTP %ld", url, code);
    return rc;
}

/* mlflow-artifacts:/path (the configured server) or mlflow-artifacts://host:port/path. */
static int put_mlflow(const struct transports *t, const struct transport_put *p, char *msg,
                      size_t msglen)
{
    const char *rest = p->uri + strlen("mlflow-artifacts:");
    char url[8192];
    if (strncmp(rest, "//", 2) == 0) {
        size_t host = strcspn(rest + 2, "/");
        snprintf(url, sizeof url, "http://%.*s", (int)host, rest + 2);
        rest += 2 + host;
    } else if (t->mlflow_server[0]) {
        snprintf(url, sizeof url, "%s", t->mlflow_server);
    } else {
        snprintf(msg, msglen,
                 "%.300s names no server: set [artifacts] mlflow_server_url to the MLflow server "
                 "that serves artifacts",
                 p->uri);
        return -EDESTADDRREQ;
    }
    while (*rest == '/')
        rest++;
    size_t ul = strlen(url);
    snprintf(url + ul, sizeof url - ul, "/api/2.0/mlflow-artifacts/artifacts/");
    CURL *h = curl_easy_init();
    if (h == NULL)
        return util_errorf(msg, msglen, -ENOMEM, "cannot start libcurl");
    int rc = append_escaped(h, url, sizeof url, rest);
    if (rc != 0)
        util_errorf(msg, msglen, rc, "URL for %.300s", p->uri);
    else
        rc = put_http(p, h, url, msg, msglen);
    curl_easy_cleanup(h);
    return rc;
}

/* ---- s3:// ---------------------------------------------------------------------------- */

static int put_s3(const struct transports *t, const struct transport_put *p, char *msg,
                  size_t msglen)
{
    const char *uri = p->uri;
    char bucket[256], data[4200];
    size_t bl = strcspn(uri + 5, "/");
    if (bl == 0 || bl >= sizeof bucket || uri[5 + bl] != '/') {
        snprintf(msg, msglen, "malformed S3 URI %.300s", uri);
        return -EINVAL;
    }
    snprintf(bucket, sizeof bucket, "%.*s", (int)bl, uri + 5);
    spool_file(p->spool, p->e->id, ".data", data, sizeof data);
    return s3_upload(&t->s3, bucket, uri + 5 + bl + 1, data, p->e->size, p->e->sha256, msg, msglen);
}

int transport_put(const struct transports *t, const struct transport_put *p, char *msg,
                  size_t msglen)
{
    const char *uri = p->uri;
    if (p->local_root)
        return put_local(p, msg, msglen);
    if (uri[0] == '/' || strncmp(uri, "file://", 7) == 0)
        return util_errorf(msg, msglen, -EPERM,
                           "local destination %s is below no allowed artifact root", uri);
    if (strncmp(uri, "mlflow-artifacts:", 17) == 0)
        return put_mlflow(t, p, msg, msglen);
    if (strncmp(uri, "s3://", 5) == 0)
        return put_s3(t, p, msg, msglen);
    snprintf(msg, msglen,
             "artifact store %.300s is not supported by this agent (local paths, file://, "
             "mlflow-artifacts: and s3:// are)",
             uri);
    return -EPROTONOSUPPORT;
}

bool transports_retryable(int rc)
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
