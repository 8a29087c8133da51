/*
 * S3 with Signature Version 4 over libcurl. Every request signs its payload's SHA-256: the
 * whole file's is known from the snapshot, a part's is computed by reading it once before
 * sending it. Requests name the bucket in the path when an endpoint is configured (MinIO,
 * Ceph, s3proxy and the like), in the host name for AWS.
 */
#define _GNU_SOURCE /* strcasestr */
#include "s3.h"

#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "http.h"

static const char EMPTY_SHA256[] =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/* ---- configuration --------------------------------------------------------------- */

static void pick(char *dst, size_t cap, const char *configured, const char *const *envs)
{
    dst[0] = '\0';
    if (configured && configured[0]) {
        snprintf(dst, cap, "%s", configured);
        return;
    }
    for (; *envs; envs++) {
        const char *v = getenv(*envs);
        if (v && v[0]) {
            snprintf(dst, cap, "%s", v);
            return;
        }
    }
}

int s3_config_init(struct s3_config *cfg, const char *endpoint, const char *region,
                   const char *access_key, const char *secret_file, char *msg, size_t msglen)
{
    memset(cfg, 0, sizeof *cfg);
    static const char *const ep_env[] = {"MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                                         "AWS_ENDPOINT_URL", NULL};
    static const char *const region_env[] = {"AWS_REGION", "AWS_DEFAULT_REGION", NULL};
    static const char *const key_env[] = {"AWS_ACCESS_KEY_ID", NULL};
    static const char *const secret_env[] = {"AWS_SECRET_ACCESS_KEY", NULL};
    static const char *const token_env[] = {"AWS_SESSION_TOKEN", NULL};
    pick(cfg->endpoint, sizeof cfg->endpoint, endpoint, ep_env);
    size_t el = strlen(cfg->endpoint);
    while (el > 0 && cfg->endpoint[el - 1] == '/')
        cfg->endpoint[--el] = '\0';
    pick(cfg->region, sizeof cfg->region, region, region_env);
    if (cfg->region[0] == '\0')
        snprintf(cfg->region, sizeof cfg->region, "us-east-1");
    pick(cfg->access_key, sizeof cfg->access_key, access_key, key_env);
    if (secret_file && secret_file[0]) {
        FILE *f = fopen(secret_file, "r");
        if (f == NULL) {
            int e = errno;
            snprintf(msg, msglen, "cannot read [artifacts] s3_secret_access_key_file %s: %s",
                     secret_file, strerror(e));
            return -e;
        }
        if (fgets(cfg->secret_key, sizeof cfg->secret_key, f) == NULL)
            cfg->secret_key[0] = '\0';
        fclose(f);
        cfg->secret_key[strcspn(cfg->secret_key, "\r\n")] = '\0';
    } else {
        pick(cfg->secret_key, sizeof cfg->secret_key, NULL, secret_env);
    }
    pick(cfg->session_token, sizeof cfg->session_token, NULL, token_env);
    return 0;
}

/* ---- signing ---------------------------------------------------------------------- */

static void hex(const uint8_t *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * n] = '\0';
}

static void sha256_hex(const void *data, size_t n, char out[65])
{
    uint8_t d[32];
    unsigned len = 0;
    EVP_Digest(data, n, d, &len, EVP_sha256(), NULL);
    hex(d, 32, out);
}

static void hmac(const void *key, size_t klen, const char *data, uint8_t out[32])
{
    unsigned len = 32;
    HMAC(EVP_sha256(), key, (int)klen, (const uint8_t *)data, strlen(data), out, &len);
}

int s3_authorization(const struct s3_config *cfg, const char *method, const char *canonical_uri,
                     const char *canonical_query, const struct s3_header *headers, size_t n,
                     const char *payload_sha256, const char *amz_date, char *out, size_t outlen)
{
    char canon[8192], names[512] = "";
    int len = snprintf(canon, sizeof canon, "%s\n%s\n%s\n", method, canonical_uri, canonical_query);
    for (size_t i = 0; i < n && len > 0 && (size_t)len < sizeof canon; i++) {
        len += snprintf(canon + len, sizeof canon - (size_t)len, "%s:%s\n", headers[i].name,
                        headers[i].value);
        size_t nl = strlen(names);
        snprintf(names + nl, sizeof names - nl, "%s%s", i ? ";" : "", headers[i].name);
    }
    if (len > 0 && (size_t)len < sizeof canon)
        len += snprintf(canon + len, sizeof canon - (size_t)len, "\n%s\n%s", names, payload_sha256);
    if (len <= 0 || (size_t)len >= sizeof canon)
        return -ENAMETOOLONG;
    char canon_hash[65], date[9], scope[128], to_sign[512];
    sha256_hex(canon, (size_t)len, canon_hash);
    snprintf(date, sizeof date, "%.8s", amz_date);
    snprintf(scope, sizeof scope, "%s/%s/s3/aws4_request", date, cfg->region);
    snprintf(to_sign, sizeof to_sign, "AWS4-HMAC-SHA256\n%s\n%s\n%s", amz_date, scope, canon_hash);
    char k0[300];
    uint8_t k1[32], k2[32], k3[32], k4[32], sig[32];
    snprintf(k0, sizeof k0, "AWS4%s", cfg->secret_key);
    hmac(k0, strlen(k0), date, k1);
    hmac(k1, 32, cfg->region, k2);
    hmac(k2, 32, "s3", k3);
    hmac(k3, 32, "aws4_request", k4);
    hmac(k4, 32, to_sign, sig);
    char sighex[65];
    hex(sig, 32, sighex);
    int w = snprintf(out, outlen, "AWS4-HMAC-SHA256 Credential=%s/%s,SignedHeaders=%s,Signature=%s",
                     cfg->access_key, scope, names, sighex);
    return w > 0 && (size_t)w < outlen ? 0 : -ENAMETOOLONG;
}

/* RFC 3986 percent-encoding as SigV4 wants it; '/' kept in paths, encoded in query values. */
static int encode(const char *in, bool keep_slash, char *out, size_t outlen)
{
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)in; *p; p++) {
        bool keep = isalnum(*p) || strchr("-._~", *p) || (keep_slash && *p == '/');
        if (o + (keep ? 1 : 3) >= outlen)
            return -ENAMETOOLONG;
        if (keep)
            out[o++] = (char)*p;
        else
            o += (size_t)snprintf(out + o, outlen - o, "%%%02X", *p);
    }
    out[o] = '\0';
    return 0;
}

int s3_encode_key(const char *key, char *out, size_t outlen)
{
    return encode(key, true, out, outlen);
}

/* ---- requests --------------------------------------------------------------------- */

struct body {
    int fd; /* -1: mem */
    uint64_t off, left;
    const char *mem;
};

static size_t read_body(char *buf, size_t size, size_t nmemb, void *arg)
{
    struct body *b = arg;
    size_t want = size * nmemb;
    if (want > b->left)
        want = (size_t)b->left;
    if (want == 0)
        return 0;
    if (b->fd < 0) {
        memcpy(buf, b->mem + b->off, want);
    } else {
        ssize_t got = pread(b->fd, buf, want, (off_t)b->off);
        if (got <= 0)
            return CURL_READFUNC_ABORT;
        want = (size_t)got;
    }
    b->off += want;
    b->left -= want;
    return want;
}

struct reply {
    char etag[128];
    char text[4096]; /* the start of the response body */
    size_t len;
};

static size_t on_header(char *buf, size_t size, size_t nmemb, void *arg)
{
    struct reply *r = arg;
    size_t n = size * nmemb;
    if (n > 5 && strncasecmp(buf, "etag:", 5) == 0) {
        const char *v = buf + 5;
        while (*v == ' ')
            v++;
        size_t vl = strcspn(v, "\r\n");
        snprintf(r->etag, sizeof r->etag, "%.*s", (int)vl, v);
    }
    return n;
}

static size_t on_body(char *buf, size_t size, size_t nmemb, void *arg)
{
    struct reply *r = arg;
    size_t n = size * nmemb, room = sizeof r->text - 1 - r->len;
    size_t take = n < room ? n : room;
    memcpy(r->text + r->len, buf, take);
    r->len += take;
    r->text[r->len] = '\0';
    return n;
}

struct target {
    char host[512];
    char url_base[1024];  /* scheme://host[/bucket] */
    char uri_prefix[512]; /* "" or "/bucket" */
};

static void target_of(const struct s3_config *cfg, const char *bucket, struct target *t)
{
    if (cfg->endpoint[0]) {
        const char *h = strstr(cfg->endpoint, "://");
        h = h ? h + 3 : cfg->endpoint;
        snprintf(t->host, sizeof t->host, "%.*s", (int)strcspn(h, "/"), h);
        snprintf(t->url_base, sizeof t->url_base, "%s/%s", cfg->endpoint, bucket);
        snprintf(t->uri_prefix, sizeof t->uri_prefix, "/%s", bucket);
    } else {
        snprintf(t->host, sizeof t->host, "%s.s3.%s.amazonaws.com", bucket, cfg->region);
        snprintf(t->url_base, sizeof t->url_base, "https://%s", t->host);
        t->uri_prefix[0] = '\0';
    }
}

/* One signed request. query is canonical (sorted, encoded); body streams from b. */
static int request(const struct s3_config *cfg, const struct target *t, const char *method,
                   const char *ekey, const char *query, struct body *b, const char *payload_sha,
                   struct reply *r, char *msg, size_t msglen)
{
    char amz[20], uri[4096], url[8192], auth[1024];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(amz, sizeof amz, "%Y%m%dT%H%M%SZ", &tm);
    snprintf(uri, sizeof uri, "%s/%s", t->uri_prefix, ekey);
    snprintf(url, sizeof url, "%s/%s%s%s", t->url_base, ekey, query[0] ? "?" : "", query);
    struct s3_header hs[4] = {{"host", t->host},
                              {"x-amz-content-sha256", payload_sha},
                              {"x-amz-date", amz},
                              {"x-amz-security-token", cfg->session_token}};
    size_t nh = cfg->session_token[0] ? 4 : 3;
    if (s3_authorization(cfg, method, uri, query, hs, nh, payload_sha, amz, auth, sizeof auth)) {
        snprintf(msg, msglen, "S3 request for %.300s is too long to sign", uri);
        return -ENAMETOOLONG;
    }
    CURL *h = curl_easy_init();
    if (h == NULL) {
        snprintf(msg, msglen, "cannot start libcurl");
        return -ENOMEM;
    }
    char hdr[4][2200];
    struct curl_slist *list = NULL;
    snprintf(hdr[0], sizeof hdr[0], "Authorization: %s", auth);
    snprintf(hdr[1], sizeof hdr[1], "x-amz-content-sha256: %s", payload_sha);
    snprintf(hdr[2], sizeof hdr[2], "x-amz-date: %s", amz);
    snprintf(hdr[3], sizeof hdr[3], "x-amz-security-token: %s", cfg->session_token);
    for (size_t i = 0; i < nh; i++)
        list = curl_slist_append(list, hdr[i]);
    list = curl_slist_append(list, "Expect:");
    char err[CURL_ERROR_SIZE];
    http_prepare(h, url, list, err);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, r);
    if (strcmp(method, "PUT") == 0 || (strcmp(method, "POST") == 0 && b)) {
        curl_easy_setopt(h, strcmp(method, "PUT") == 0 ? CURLOPT_UPLOAD : CURLOPT_POST, 1L);
        curl_easy_setopt(h, CURLOPT_READFUNCTION, read_body);
        curl_easy_setopt(h, CURLOPT_READDATA, b);
        if (strcmp(method, "PUT") == 0)
            curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)b->left);
        else
            curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)b->left);
    } else if (strcmp(method, "POST") == 0) {
        curl_easy_setopt(h, CURLOPT_POST, 1L);
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, 0L);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, "");
    } else {
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
    }
    long code;
    int prc = http_perform(h, method, url, err, &code, msg, msglen);
    curl_slist_free_all(list);
    curl_easy_cleanup(h);
    if (prc != 0)
        return prc;
    /* S3 may answer 200 with an <Error> body (CompleteMultipartUpload does). */
    if (code >= 200 && code < 300 && strstr(r->text, "<Error>") == NULL)
        return 0;
    const char *c = strstr(r->text, "<Code>");
    snprintf(msg, msglen, "%s %.200s: HTTP %ld %.*s", method, url, code,
             c ? (int)strcspn(c + 6, "<") : 0, c ? c + 6 : "");
    return code < 300 ? -EAGAIN : http_status_error(code);
}

static int part_sha(int fd, uint64_t off, uint64_t len, char out[65])
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    uint8_t *buf = malloc(1 << 20);
    int rc = md && buf && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1 ? 0 : -ENOMEM;
    while (rc == 0 && len > 0) {
        size_t want = len < (1 << 20) ? (size_t)len : (1 << 20);
        ssize_t got = pread(fd, buf, want, (off_t)off);
        if (got <= 0) {
            rc = got < 0 ? -errno : -EIO;
            break;
        }
        EVP_DigestUpdate(md, buf, (size_t)got);
        off += (uint64_t)got;
        len -= (uint64_t)got;
    }
    if (rc == 0) {
        uint8_t d[32];
        unsigned dl = 0;
        EVP_DigestFinal_ex(md, d, &dl);
        hex(d, 32, out);
    }
    EVP_MD_CTX_free(md);
    free(buf);
    return rc;
}

static int multipart(const struct s3_config *cfg, const struct target *t, const char *ekey, int fd,
                     uint64_t size, char *msg, size_t msglen)
{
    struct reply r = {0};
    int rc = request(cfg, t, "POST", ekey, "uploads=", NULL, EMPTY_SHA256, &r, msg, msglen);
    if (rc != 0)
        return rc;
    const char *u = strstr(r.text, "<UploadId>");
    if (u == NULL) {
        snprintf(msg, msglen, "S3 did not return an UploadId for %.300s", ekey);
        return -EIO;
    }
    char upload_id[1024], eid[3100];
    snprintf(upload_id, sizeof upload_id, "%.*s", (int)strcspn(u + 10, "<"), u + 10);
    encode(upload_id, false, eid, sizeof eid);
    size_t nparts = (size_t)((size + S3_PART_BYTES - 1) / S3_PART_BYTES);
    size_t cap = 200 + nparts * 200;
    char *xml = malloc(cap);
    if (xml == NULL)
        return -ENOMEM;
    size_t xl = (size_t)snprintf(xml, cap, "<CompleteMultipartUpload>");
    for (size_t i = 0; i < nparts && rc == 0; i++) {
        uint64_t off = i * S3_PART_BYTES;
        uint64_t len = size - off < S3_PART_BYTES ? size - off : S3_PART_BYTES;
        char sha[65], query[3200];
        if ((rc = part_sha(fd, off, len, sha)) != 0) {
            snprintf(msg, msglen, "cannot read part %zu of the spool copy: %s", i + 1,
                     strerror(-rc));
            break;
        }
        /* Canonical query: parameters sorted by name. */
        snprintf(query, sizeof query, "partNumber=%zu&uploadId=%s", i + 1, eid);
        for (int attempt = 0; attempt < S3_PART_ATTEMPTS; attempt++) {
            struct reply pr = {0};
            struct body b = {fd, off, len, NULL};
            rc = request(cfg, t, "PUT", ekey, query, &b, sha, &pr, msg, msglen);
            if (rc == 0) {
                xl += (size_t)snprintf(xml + xl, cap - xl,
                                       "<Part><PartNumber>%zu</PartNumber><ETag>%s</ETag></Part>",
                                       i + 1, pr.etag);
                break;
            }
            if (rc == -EACCES)
                break;
        }
    }
    if (rc == 0) {
        xl += (size_t)snprintf(xml + xl, cap - xl, "</CompleteMultipartUpload>");
        char sha[65], query[3200];
        sha256_hex(xml, xl, sha);
        snprintf(query, sizeof query, "uploadId=%s", eid);
        struct body b = {-1, 0, xl, xml};
        struct reply cr = {0};
        rc = request(cfg, t, "POST", ekey, query, &b, sha, &cr, msg, msglen);
    }
    if (rc != 0) {
        /* Parts left behind cost storage: abort, keeping the first error's message. */
        char query[3200], ignored[256];
        struct reply ar = {0};
        snprintf(query, sizeof query, "uploadId=%s", eid);
        request(cfg, t, "DELETE", ekey, query, NULL, EMPTY_SHA256, &ar, ignored, sizeof ignored);
    }
    free(xml);
    return rc;
}

int s3_upload(const struct s3_config *cfg, const char *bucket, const char *key, const char *path,
              uint64_t size, const char *sha256, char *msg, size_t msglen)
{
    if (cfg->access_key[0] == '\0' || cfg->secret_key[0] == '\0') {
        snprintf(msg, msglen,
                 "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the "
                 "agent, or [artifacts] s3_access_key_id and s3_secret_access_key_file");
        return -EACCES;
    }
    struct target t;
    char ekey[4096];
    target_of(cfg, bucket, &t);
    if (s3_encode_key(key, ekey, sizeof ekey) != 0) {
        snprintf(msg, msglen, "S3 key too long: %.200s", key);
        return -ENAMETOOLONG;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        snprintf(msg, msglen, "cannot open the spool copy %.300s: %s", path, strerror(e));
        return -e;
    }
    int rc;
    if (size > S3_PART_BYTES) {
        rc = multipart(cfg, &t, ekey, fd, size, msg, msglen);
    } else {
        struct reply r = {0};
        struct body b = {fd, 0, size, NULL};
        rc = request(cfg, &t, "PUT", ekey, "", &b, sha256, &r, msg, msglen);
    }
    close(fd);
    return rc;
}
