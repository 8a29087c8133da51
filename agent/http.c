/* libcurl settings and error mapping for the artifact transports (http.h). */
#include "http.h"

#include <errno.h>
#include <stdio.h>

void http_prepare(CURL *h, const char *url, struct curl_slist *headers, char *errbuf)
{
    errbuf[0] = '\0';
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, 10000L);
    /* A store that stalls is a store that is down: below 1 KiB/s for 60 s, retry later. */
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1024L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, 60L);
}

int http_transfer_error(CURLcode cc)
{
    switch (cc) {
    case CURLE_COULDNT_CONNECT: return -ECONNREFUSED;
    case CURLE_OPERATION_TIMEDOUT: return -ETIMEDOUT;
    case CURLE_COULDNT_RESOLVE_HOST: return -EHOSTUNREACH;
    default: return -EIO;
    }
}

int http_status_error(long code)
{
    if (code >= 200 && code < 300)
        return 0;
    return code >= 500 || code == 429 || code == 408 ? -EAGAIN : -EACCES;
}

int http_perform(CURL *h, const char *method, const char *url, const char *errbuf, long *status,
                 char *msg, size_t msglen)
{
    CURLcode cc = curl_easy_perform(h);
    *status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, status);
    if (cc == CURLE_OK)
        return 0;
    snprintf(msg, msglen, "%s %.200s: %.200s", method, url,
             errbuf[0] ? errbuf : curl_easy_strerror(cc));
    return http_transfer_error(cc);
}
