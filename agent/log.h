/*
 * Agent logging: one line per event on stderr, "time level [object] message".
 * The level test happens before the arguments are evaluated, and the
 * rate-limited form keeps a repeating failure (a database outage, a client
 * sending garbage in a loop) from flooding the log.
 */
#ifndef TRACKD_LOG_H
#define TRACKD_LOG_H

#include <stddef.h>
#include <stdint.h>

enum log_level { LOG_ERROR = 0, LOG_WARN = 1, LOG_INFO = 2, LOG_DEBUG = 3 };

extern int log_level_current;

void log_set_level(int level);
#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
void log_write(int level, const char *fmt, ...);

/*
 * Allows one line per interval_ms for a given call site; returns how many
 * lines were suppressed since the last one allowed (0 or more), or -1 when
 * this one is suppressed too.
 */
int64_t log_ratelimit(int64_t *last_ms, int64_t *suppressed, int64_t interval_ms);

/*
 * Text that must never be printed (the database password, from the DSN or
 * password_file). Every log line, and every error message sent to a client,
 * is scrubbed: each occurrence is printed as "****". Call at start-up, before
 * other threads log; up to 4 secrets, empty ones ignored.
 */
void log_add_secret(const char *secret);
/* Scrubs buf (NUL-terminated) in place; the text only gets shorter or stays the same. */
/*
 * Copies in to out with control characters escaped ("\n", "\r", "\t", "\x1b", ...), so text a
 * client chose (a claimed user, a path, a key) can never start a log line of its own or send
 * terminal escapes. log_write applies it to every line. Truncates to outlen - 1 bytes at a
 * character boundary; returns the length written.
 */
size_t log_escape(const char *in, char *out, size_t outlen);
void log_scrub(char *buf);

#define log_at(level, ...)                                                                         \
    do {                                                                                           \
        if ((level) <= log_level_current)                                                          \
            log_write((level), __VA_ARGS__);                                                       \
    } while (0)

#define log_error(...) log_at(LOG_ERROR, __VA_ARGS__)
#define log_warn(...) log_at(LOG_WARN, __VA_ARGS__)
#define log_info(...) log_at(LOG_INFO, __VA_ARGS__)
#define log_debug(...) log_at(LOG_DEBUG, __VA_ARGS__)

/* At most one line per 5 s from this call site, noting how many were held back. */
#define log_limited(level, ...)                                                                    \
    do {                                                                                           \
        static int64_t last_ms_, suppressed_;                                                      \
        if ((level) <= log_level_current) {                                                        \
            int64_t held_ = log_ratelimit(&last_ms_, &suppressed_, 5000);                          \
            if (held_ > 0)                                                                         \
                log_write((level), "(%lld similar lines suppressed)", (long long)held_);           \
            if (held_ >= 0)                                                                        \
                log_write((level), __VA_ARGS__);                                                   \
        }                                                                                          \
    } while (0)

#endif
