/*
 * What the artifact uploads share over libcurl: the connection settings (a store that
 * stalls counts as down) and how a failure maps to an error code the retry policy in
 * transports.c understands. For worker threads; every call here may block.
 */
#ifndef TRACKD_HTTP_H
#define TRACKD_HTTP_H

#include <curl/curl.h>
#include <stddef.h>

/* URL, headers, error buffer (CURL_ERROR_SIZE), no signals, connect and stall timeouts. */
void http_prepare(CURL *h, const char *url, struct curl_slist *headers, char *errbuf);
/* A transfer that failed: -ECONNREFUSED, -ETIMEDOUT, -EHOSTUNREACH or -EIO (all retried). */
int http_transfer_error(CURLcode cc);
/*
 * Performs the transfer h was prepared for (http_prepare with errbuf). 0 with *status the
 * HTTP status; or, when the transfer itself failed, http_transfer_error's code with msg
 * "<method> <url>: <libcurl's reason>".
 */
int http_perform(CURL *h, const char *method, const char *url, const char *errbuf, long *status,
                 char *msg, size_t msglen);
/* An HTTP status: 0 for 2xx, -EAGAIN for 5xx, 429 and 408 (retried), else -EACCES. */
int http_status_error(long code);

#endif
