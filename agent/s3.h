/*
 * S3 uploads for the artifact workers: AWS Signature Version 4, a single PUT below the
 * multipart threshold, and a multipart upload (parts retried, aborted on failure) above it.
 * Bodies stream from the spool file with pread, so memory stays flat whatever the size.
 * Blocking libcurl calls: for worker threads only.
 */
#ifndef TRACKD_S3_H
#define TRACKD_S3_H

#include <stddef.h>
#include <stdint.h>

#define S3_PART_BYTES (64ull << 20) /* multipart above this size, in parts of it */
#define S3_PART_ATTEMPTS 3

struct s3_config {
    char endpoint[512]; /* "http://host:port" (path-style requests); "" = AWS, virtual-hosted */
    char region[64];
    char access_key[128];
    char secret_key[256];
    char session_token[2048];
};

/*
 * Fills cfg from [artifacts] s3_endpoint_url / s3_region / s3_access_key_id /
 * s3_secret_access_key_file, falling back to the usual environment (AWS_ACCESS_KEY_ID,
 * AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or AWS_DEFAULT_REGION,
 * MLFLOW_S3_ENDPOINT_URL or AWS_ENDPOINT_URL_S3). Returns 0 or -errno with msg.
 */
int s3_config_init(struct s3_config *cfg, const char *endpoint, const char *region,
                   const char *access_key, const char *secret_file, char *msg, size_t msglen);

/* One header of a request to sign: name lower-case, value trimmed. */
struct s3_header {
    const char *name;
    const char *value;
};

/*
 * The Authorization header value for a request: headers sorted by name and including host,
 * x-amz-content-sha256 and x-amz-date (amz_date "YYYYMMDDTHHMMSSZ"); canonical_uri and
 * canonical_query already encoded. Exposed for the unit test against AWS's examples.
 */
int s3_authorization(const struct s3_config *cfg, const char *method, const char *canonical_uri,
                     const char *canonical_query, const struct s3_header *headers, size_t n,
                     const char *payload_sha256, const char *amz_date, char *out, size_t outlen);

/* Percent-encodes an S3 key for a URI path: '/' kept, unreserved characters kept. */
int s3_encode_key(const char *key, char *out, size_t outlen);

/*
 * Uploads size bytes of the file at path (whose SHA-256 is sha256) to s3://bucket/key.
 * Returns 0, or -errno with msg: connection problems and 5xx as retryable codes (-EAGAIN,
 * -ECONNREFUSED, -ETIMEDOUT, -EIO), refusals (4xx) as -EACCES.
 */
int s3_upload(const struct s3_config *cfg, const char *bucket, const char *key, const char *path,
              uint64_t size, const char *sha256, char *msg, size_t msglen);

#endif
