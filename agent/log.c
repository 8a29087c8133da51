/*
 * Log sink. Lines go to stderr, which systemd and the test harness both
 * capture; a single fprintf per line keeps lines whole across threads.
 */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util.h"

int log_level_current = LOG_INFO;

static const char *const level_names[] = {"ERROR", "WARN", "INFO", "DEBUG"};

#define MAX_SECRETS 4
static char *secrets[MAX_SECRETS];
static size_t nsecrets;

void log_add_secret(const char *secret)
{
    if (secret == NULL || secret[0] == '\0' || nsecrets == MAX_SECRETS)
        return;
    for (size_t i = 0; i < nsecrets; i++)
        if (strcmp(secrets[i], secret) == 0)
            return;
    char *copy = strdup(secret);
    if (copy)
        secrets[nsecrets++] = copy;
}

void log_scrub(char *buf)
{
    for (size_t i = 0; i < nsecrets; i++) {
        size_t n = strlen(secrets[i]);
        char *from = buf, *hit;
        while ((hit = strstr(from, secrets[i])) != NULL) {
            /* "****" for secrets of 4 bytes or more; as many stars as bytes below that. */
            size_t stars = n < 4 ? n : 4;
            memset(hit, '*', stars);
            memmove(hit + stars, hit + n, strlen(hit + n) + 1);
            from = hit + stars;
        }
    }
}

void log_set_level(int level)
{
    log_level_current = level;
}

size_t log_escape(const char *in, char *out, size_t outlen)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    if (outlen == 0)
        return 0;
    for (const unsigned char *p = (const unsigned char *)in; *p; p++) {
        char rep[5];
        size_t n = 0;
        if (*p == '\n')
            rep[n++] = '\\', rep[n++] = 'n';
        else if (*p == '\r')
            rep[n++] = '\\', rep[n++] = 'r';
        else if (*p == '\t')
            rep[n++] = '\\', rep[n++] = 't';
        else if (*p < 0x20 || *p == 0x7f)
            rep[n++] = '\\', rep[n++] = 'x', rep[n++] = hex[*p >> 4], rep[n++] = hex[*p & 15];
        else
            rep[n++] = (char)*p;
        if (o + n >= outlen)
            break;
        memcpy(out + o, rep, n);
        o += n;
    }
    out[o] = '\0';
    return o;
}

void log_write(int level, const char *fmt, ...)
{
    char raw[2048], msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(raw, sizeof raw, fmt, ap);
    va_end(ap);
    /* One place for every string a client can put in a line: a line stays one line. */
    log_escape(raw, msg, sizeof msg);
    log_scrub(msg);

    char when[UTIL_ISO_TIME_LEN];
    util_iso_time_now(when);
    fprintf(stderr, "%s %s %s\n", when, level_names[level < 0 ? 0 : level > 3 ? 3 : level], msg);
}

int64_t log_ratelimit(int64_t *last_ms, int64_t *suppressed, int64_t interval_ms)
{
    int64_t now = util_clock_ms(CLOCK_MONOTONIC);
    if (*last_ms != 0 && now - *last_ms < interval_ms) {
        (*suppressed)++;
        return -1;
    }
    *last_ms = now;
    int64_t held = *suppressed;
    *suppressed = 0;
    return held;
}
