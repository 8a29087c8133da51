/*
 * A test-only LD_PRELOAD library: makes one uid's NSS lookup and one host name's resolution
 * slow, the way a stalled LDAP server or DNS resolver is, so that the integration tests can
 * show the agent does not wait for either on its loop (test_connect.py).
 *
 *   SLOWLIB_MS     the delay in milliseconds (default 2000)
 *   SLOWLIB_UID    getpwuid_r() for this uid sleeps first
 *   SLOWLIB_HOST   getaddrinfo() for this name sleeps first, then resolves SLOWLIB_ADDR
 *                  (default 127.0.0.1) instead
 *
 * Each slow call appends one line ("uid N" or "host NAME") to SLOWLIB_LOG when it is set.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

static void delay(const char *what)
{
    const char *ms = getenv("SLOWLIB_MS");
    long n = ms ? strtol(ms, NULL, 10) : 2000;
    struct timespec ts = {n / 1000, (n % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
    const char *log = getenv("SLOWLIB_LOG");
    FILE *f = log ? fopen(log, "a") : NULL;
    if (f) {
        fprintf(f, "%s\n", what);
        fclose(f);
    }
}

int getpwuid_r(uid_t uid, struct passwd *pw, char *buf, size_t size, struct passwd **res)
{
    int (*real)(uid_t, struct passwd *, char *, size_t, struct passwd **) =
        (int (*)(uid_t, struct passwd *, char *, size_t, struct passwd **))dlsym(RTLD_NEXT,
                                                                                 "getpwuid_r");
    const char *slow = getenv("SLOWLIB_UID");
    if (slow && strtoul(slow, NULL, 10) == (unsigned long)uid) {
        char what[32];
        snprintf(what, sizeof what, "uid %u", (unsigned)uid);
        delay(what);
    }
    return real(uid, pw, buf, size, res);
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res)
{
    int (*real)(const char *, const char *, const struct addrinfo *, struct addrinfo **) =
        (int (*)(const char *, const char *, const struct addrinfo *, struct addrinfo **))dlsym(
            RTLD_NEXT, "getaddrinfo");
    const char *slow = getenv("SLOWLIB_HOST");
    if (slow && node && strcmp(node, slow) == 0) {
        char what[300];
        snprintf(what, sizeof what, "host %s", node);
        delay(what);
        const char *addr = getenv("SLOWLIB_ADDR");
        node = addr ? addr : "127.0.0.1";
    }
    return real(node, service, hints, res);
}
