/*
 * config — parse agent.toml and TRACKD_* overrides into struct trackd_config.
 *
 * The file format is a strict TOML subset read in one bounded pass, line by line: anything we do
 * not understand is an error with file:line:column, because a silently ignored setting is worse
 * than a daemon that refuses to start. Loads work on a copy of the struct and commit only on
 * success, so a bad file or variable never leaves a half-applied configuration behind.
 */
#include "config.h"

#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define CONFIG_MAX_FILE (1024 * 1024)
#define CONFIG_MAX_LINE (64 * 1024)
#define CONFIG_MAX_PATH 4095

#if defined(__GNUC__)
#define PRINTF_LIKE(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define PRINTF_LIKE(fmt, args)
#endif

/* KEY_ENUM: one of the key's names (a NULL-terminated list), stored as its index in an int. */
#ifndef TRACKD_VERSION
#error "TRACKD_VERSION comes from the CMake project's version (CMakeLists.txt)"
#endif

const char trackd_version[] = TRACKD_VERSION;

enum key_type { KEY_STRING, KEY_U32, KEY_U64, KEY_MODE, KEY_ENUM, KEY_BOOL };

/* Marks postgres.dsn, whose password config_dump() must never print. */
#define KEY_SECRET_DSN 1u

struct config_key {
    const char *section;
    const char *name;
    enum key_type type;
    size_t offset;           /* of the field in struct trackd_config */
    const char *str_default; /* KEY_STRING only */
    uint64_t int_default;    /* the other types */
    uint64_t min, max;       /* integers: value range; strings: length range in bytes */
    unsigned flags;
    const char *doc;
    const char *const *names; /* KEY_ENUM only */
};

#define FIELD(f) offsetof(struct trackd_config, f)
#define STR(sec, name, f, def, lo, hi, doc)                                                        \
    {                                                                                              \
        sec, name, KEY_STRING, FIELD(f), def, 0, lo, hi, 0, doc, NULL                              \
    }
#define NUM(sec, name, type, f, def, lo, hi, doc)                                                  \
    {                                                                                              \
        sec, name, type, FIELD(f), NULL, def, lo, hi, 0, doc, NULL                                 \
    }
#define ENUM(sec, name, f, def, names, doc)                                                        \
    {                                                                                              \
        sec, name, KEY_ENUM, FIELD(f), NULL, def, 0, 0, 0, doc, names                              \
    }

static const char *const level_names[] = {"error", "warn", "info", "debug", NULL};
static const char *const fsync_names[] = {"always", "interval", "never", NULL};

/*
 * Rows of one section must be adjacent: config_dump() prints a header whenever the section
 * changes. String minimums are 0 or 1 (see value_store()). The socket path limit is
 * sizeof(sun_path) - 1 so a too-long path fails here rather than at bind().
 */
static const struct config_key keys[] = {
    STR("agent", "socket", socket_path, "/run/trackd/trackd.sock", 1, 107,
        "Unix socket path the agent listens on"),
    NUM("agent", "socket_mode", KEY_MODE, socket_mode, 0660, 0, 0777, "File mode of the socket"),
    STR("agent", "socket_group", socket_group, "", 0, 255,
        "Group owning the socket, name or numeric gid; empty means the agent's own group"),
    NUM("agent", "max_connections", KEY_U32, max_connections, 1024, 1, 65536,
        "Maximum number of concurrent client connections"),
    NUM("agent", "max_connections_per_uid", KEY_U32, max_connections_per_uid, 256, 1, 65536,
        "Of those, the most one uid may hold, so that one user cannot take them all"),
    NUM("agent", "max_frame_bytes", KEY_U32, max_frame_bytes, 1048576, 1048576, 67108864,
        "Hard cap on one frame body, in bytes"),
    NUM("agent", "trust_client_user", KEY_BOOL, trust_client_user, 0, 0, 1,
        "Take mlflow.user from the client; false: from the peer's uid (SO_PEERCRED)"),
    STR("agent", "allowed_uids", allowed_uids, "", 0, CONFIG_MAX_LINE,
        "Comma-separated users (names or uids) allowed to connect; empty: no uid rule"),
    STR("agent", "allowed_gids", allowed_gids, "", 0, CONFIG_MAX_LINE,
        "Comma-separated groups (names or gids) allowed to connect; empty: no gid rule"),
    STR("agent", "shared_gids", shared_gids, "", 0, CONFIG_MAX_LINE,
        "Comma-separated groups (names or gids, at most 16) whose members may write each "
        "other's runs; empty: a run is written only by the uid that started it"),
    NUM("agent", "open_unowned_runs", KEY_BOOL, open_unowned_runs, 0, 0, 1,
        "Any local user may write runs trackd did not start; false: only the user their "
        "user_id names"),
    NUM("agent", "hello_timeout_ms", KEY_U32, hello_timeout_ms, 10000, 100, 600000,
        "A connection that has not said hello within this long is closed"),
    NUM("agent", "frame_timeout_ms", KEY_U32, frame_timeout_ms, 30000, 100, 3600000,
        "A frame that is still incomplete this long after its first byte closes the connection"),
    NUM("agent", "idle_timeout_ms", KEY_U32, idle_timeout_ms, 0, 0, UINT32_MAX,
        "A connection that sends nothing for this long is closed; 0: never"),
    NUM("agent", "max_frames_per_sec", KEY_U32, max_frames_per_sec, 20000, 0, UINT32_MAX,
        "Frames one connection may send per second before it is read more slowly; 0: no limit"),
    NUM("agent", "max_reply_bytes", KEY_U32, max_reply_bytes, 4194304, 65536, 1073741824,
        "Replies queued for a client that does not read them before it is disconnected"),
    NUM("agent", "max_read_buffer_bytes", KEY_U64, max_read_buffer_bytes, 67108864, 1048576,
        UINT64_C(17179869184),
        "Memory for incomplete frames over all connections; above it the oldest is closed"),
    ENUM("agent", "log_level", log_level, CONFIG_LOG_INFO, level_names,
         "One of \"error\", \"warn\", \"info\", \"debug\""),
    NUM("agent", "shutdown_grace_ms", KEY_U32, shutdown_grace_ms, 10000, 0, 3600000,
        "Time to drain buffered events to PostgreSQL on SIGTERM"),
    {"postgres", "dsn", KEY_STRING, FIELD(pg_dsn), "postgresql:///mlflow", 0, 1, CONFIG_MAX_LINE,
     KEY_SECRET_DSN, "libpq connection string or URI", NULL},
    STR("postgres", "password_file", pg_password_file, "", 0, CONFIG_MAX_PATH,
        "File whose first line is the password; empty means none"),
    NUM("postgres", "connect_timeout_ms", KEY_U32, pg_connect_timeout_ms, 10000, 100, 600000,
        "Timeout for one connection attempt to one address; a connect_timeout in the DSN wins"),
    NUM("postgres", "seed_views", KEY_BOOL, seed_views, 0, 0, 1,
        "Create the mlflow_* convenience views (they block MLflow column-type migrations)"),
    STR("mlflow", "default_artifact_root", artifact_root, "/var/lib/trackd/artifacts", 1,
        CONFIG_MAX_PATH,
        "Artifact root for experiments the agent creates (root + \"/\" + experiment_id)"),
    STR("mlflow", "allowed_revisions", allowed_revisions, "", 0, CONFIG_MAX_LINE,
        "Comma-separated alembic revisions treated as tested (no warning at start)"),
    STR("mlflow", "backend_uri", backend_uri, "", 0, CONFIG_MAX_LINE,
        "MLflow backend store URI announced to clients for reads; never with a password"),
    STR("artifacts", "allowed_roots", allowed_roots, "", 0, CONFIG_MAX_LINE,
        "Comma-separated artifact roots (paths, file:// or s3:// URIs) where clients may place "
        "experiments and the agent may upload, besides mlflow.default_artifact_root and the "
        "mlflow_server_url server"),
    STR("artifacts", "mlflow_server_url", mlflow_server_url, "", 0, CONFIG_MAX_LINE,
        "MLflow server serving artifacts, for mlflow-artifacts: URIs without a host"),
    STR("artifacts", "s3_endpoint_url", s3_endpoint_url, "", 0, CONFIG_MAX_LINE,
        "S3-compatible endpoint (path-style requests); empty: MLFLOW_S3_ENDPOINT_URL or AWS"),
    STR("artifacts", "s3_region", s3_region, "", 0, 64,
        "S3 region for signing; empty: AWS_REGION, AWS_DEFAULT_REGION or us-east-1"),
    STR("artifacts", "s3_access_key_id", s3_access_key_id, "", 0, 128,
        "S3 access key id; empty: AWS_ACCESS_KEY_ID"),
    STR("artifacts", "s3_secret_access_key_file", s3_secret_file, "", 0, CONFIG_MAX_PATH,
        "File whose first line is the S3 secret key; empty: AWS_SECRET_ACCESS_KEY"),
    STR("journal", "dir", journal_dir, "/var/lib/trackd/journal", 1, CONFIG_MAX_PATH,
        "Directory of the on-disk journal"),
    ENUM("journal", "fsync", journal_fsync, CONFIG_FSYNC_INTERVAL, fsync_names,
         "When the journal is fsynced: \"always\", \"interval\" or \"never\""),
    NUM("journal", "fsync_interval_ms", KEY_U32, journal_fsync_interval_ms, 100, 1, 60000,
        "With fsync = \"interval\": the longest a journaled event waits for its fsync"),
    NUM("journal", "quota_bytes", KEY_U64, journal_quota_bytes, 1073741824, 1048576,
        UINT64_C(1099511627776), "Disk the journal may use; above it clients are paused"),
    NUM("journal", "segment_bytes", KEY_U64, journal_segment_bytes, 67108864, 65536, 1073741824,
        "Size at which the journal starts a new segment file"),
    NUM("batch", "max_rows", KEY_U32, batch_max_rows, 20000, 1, 10000000,
        "Rows per database transaction"),
    NUM("batch", "max_bytes", KEY_U64, batch_max_bytes, 8388608, 4096, 1073741824,
        "Bytes per database transaction"),
    NUM("batch", "max_age_ms", KEY_U32, batch_max_age_ms, 100, 1, 60000,
        "The oldest buffered event waits at most this long before a batch is cut"),
    NUM("batch", "max_pending_bytes", KEY_U64, max_pending_bytes, 33554432, 1048576,
        UINT64_C(17179869184), "Memory for buffered events; above it client reads pause"),
};

#define NKEYS (sizeof keys / sizeof keys[0])

static const char *const sections[] = {"agent",     "postgres", "mlflow",
                                       "artifacts", "journal",  "batch"};

#define NSECTIONS (sizeof sections / sizeof sections[0])

static void *field_of(const struct trackd_config *c, const struct config_key *k)
{
    return (char *)c + k->offset;
}

static uint64_t key_get_int(const struct trackd_config *c, const struct config_key *k)
{
    void *p = field_of(c, k);

    switch (k->type) {
    case KEY_U32: return *(uint32_t *)p;
    case KEY_U64: return *(uint64_t *)p;
    case KEY_MODE: return *(unsigned *)p;
    case KEY_ENUM: return (uint64_t) * (int *)p;
    case KEY_BOOL: return *(bool *)p;
    case KEY_STRING: break;
    }
    assert(!"string key has no integer value");
    return 0;
}

static void key_set_int(struct trackd_config *c, const struct config_key *k, uint64_t v)
{
    void *p = field_of(c, k);

    switch (k->type) {
    case KEY_U32: *(uint32_t *)p = (uint32_t)v; break;
    case KEY_U64: *(uint64_t *)p = v; break;
    case KEY_MODE: *(unsigned *)p = (unsigned)v; break;
    case KEY_ENUM: *(int *)p = (int)v; break;
    case KEY_BOOL: *(bool *)p = v != 0; break;
    case KEY_STRING: assert(!"string key has no integer value"); break;
    }
}

/*
 * Stores owned into a working copy made from orig. A string the working copy still shares with
 * orig is left alone, since orig keeps it unless the load commits.
 */
static void key_set_str(struct trackd_config *work, const struct trackd_config *orig,
                        const struct config_key *k, char *owned)
{
    char **slot = field_of(work, k);

    if (*slot != *(char **)field_of(orig, k))
        free(*slot);
    *slot = owned;
}

/* Ends a load: on commit orig takes work's values, otherwise work's new strings are dropped. */
static void config_txn_end(struct trackd_config *orig, struct trackd_config *work, bool commit)
{
    for (size_t i = 0; i < NKEYS; i++) {
        char *old, *new;
        if (keys[i].type != KEY_STRING)
            continue;
        old = *(char **)field_of(orig, &keys[i]);
        new = *(char **)field_of(work, &keys[i]);
        if (old != new)
            free(commit ? old : new);
    }
    if (commit)
        *orig = *work;
}

static int error_set(struct config_error *err, const char *where, int line, int column,
                     const char *fmt, ...) PRINTF_LIKE(5, 6);

/* Fills err; where must not point into err. Returns -EINVAL, the code of most failures. */
static int error_set(struct config_error *err, const char *where, int line, int column,
                     const char *fmt, ...)
{
    va_list ap;

    snprintf(err->where, sizeof err->where, "%s", where);
    err->line = line;
    err->column = column;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return -EINVAL;
}

/* The "must ..." half of a value complaint, shared by the file and environment paths. */
static void key_expect(const struct config_key *k, char *buf, size_t len)
{
    switch (k->type) {
    case KEY_STRING: snprintf(buf, len, "must be a string"); break;
    case KEY_BOOL: snprintf(buf, len, "must be true or false"); break;
    case KEY_ENUM: {
        size_t n = (size_t)snprintf(buf, len, "must be one of");
        for (size_t i = 0; k->names[i] && n < len; i++)
            n += (size_t)snprintf(buf + n, len - n, "%s\"%s\"",
                                  i == 0                    ? " "
                                  : k->names[i + 1] == NULL ? " or "
                                                            : ", ",
                                  k->names[i]);
        break;
    }
    case KEY_MODE:
        snprintf(buf, len, "must be an octal file mode between 0o%03" PRIo64 " and 0o%03" PRIo64,
                 k->min, k->max);
        break;
    case KEY_U32:
    case KEY_U64:
        snprintf(buf, len, "must be an integer between %" PRIu64 " and %" PRIu64, k->min, k->max);
        break;
    }
}

static int enum_find(const struct config_key *k, const char *s)
{
    for (size_t i = 0; k->names[i]; i++)
        if (strcmp(s, k->names[i]) == 0)
            return (int)i;
    return -1;
}

/* Returns the value of the hex digit c, or 16 when c is none. */
static unsigned digit_value(unsigned char c)
{
    if (isdigit(c))
        return (unsigned)(c - '0');
    return isxdigit(c) ? (unsigned)(tolower(c) - 'a' + 10) : 16;
}

/*
 * Parses a TOML integer from s[0..n): optional sign, decimal, or unsigned 0x/0o, with _ only
 * between digits. legacy_octal lets "0660" mean octal the way chmod users write it; TOML itself
 * forbids leading zeros, so only environment values use it. Returns NULL, or why s is not an
 * integer. *overflow reports digits beyond 64 bits, which every key's range rejects anyway.
 */
static const char *int_parse(const char *s, size_t n, bool legacy_octal, uint64_t *out, bool *neg,
                             bool *overflow)
{
    unsigned base = 10;
    bool prev_digit = false;

    *out = 0;
    *neg = *overflow = false;
    if (n > 0 && (*s == '+' || *s == '-')) {
        *neg = *s == '-';
        if (n >= 3 && s[1] == '0' && (s[2] == 'x' || s[2] == 'o'))
            return "a sign is not allowed before 0x or 0o";
        s++, n--;
    }
    if (n >= 2 && s[0] == '0' && s[1] == 'b')
        return "binary integers are not supported";
    if (n >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'o')) {
        base = s[1] == 'x' ? 16 : 8;
        s += 2, n -= 2;
    } else if (n >= 2 && s[0] == '0') {
        if (!legacy_octal)
            return "leading zeros are not allowed (write octal with 0o, as in 0o660)";
        base = 8;
    }
    if (n == 0)
        return "it has no digits";
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        unsigned d = digit_value(c);
        if (c == '_') {
            if (!prev_digit || i + 1 == n)
                return "underscores must sit between digits";
            prev_digit = false;
            continue;
        }
        if (d >= base)
            return base == 8 ? "it has a character that is not an octal digit"
                             : "it has a character that is not a digit";
        if (*out > (UINT64_MAX - d) / base)
            *overflow = true;
        else
            *out = *out * base + d;
        prev_digit = true;
    }
    return NULL;
}

/* Returns the length of the valid UTF-8 sequence at s, or 0 for an invalid one. */
static size_t utf8_len(const char *str, const char *end)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t n;
    uint32_t cp, min;

    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xC2 && s[0] <= 0xDF)
        n = 2, cp = s[0] & 0x1Fu, min = 0x80;
    else if ((s[0] & 0xF0) == 0xE0)
        n = 3, cp = s[0] & 0x0Fu, min = 0x800;
    else if (s[0] >= 0xF0 && s[0] <= 0xF4)
        n = 4, cp = s[0] & 0x07u, min = 0x10000;
    else
        return 0;
    if ((size_t)(end - str) < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = cp << 6 | (s[i] & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

static size_t utf8_encode(uint32_t cp, char *out)
{
    size_t n = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    static const unsigned char lead[] = {0, 0x00, 0xC0, 0xE0, 0xF0};

    for (size_t i = n - 1; i > 0; i--, cp >>= 6)
        out[i] = (char)(0x80 | (cp & 0x3F));
    out[0] = (char)(lead[n] | cp);
    return n;
}

/* TOML forbids raw control characters everywhere except tab. */
static bool is_control(unsigned char c)
{
    return (c < 0x20 && c != '\t') || c == 0x7F;
}

/* VAL_NONE is an environment value that is not an integer where one is needed. */
enum value_kind { VAL_NONE, VAL_STRING, VAL_INTEGER, VAL_BOOL };

struct value {
    enum value_kind kind;
    char *str; /* VAL_STRING: owned by whoever filled the struct, until value_store() takes it */
    size_t len;
    uint64_t mag;
    bool neg, overflow;
    const char *end; /* first byte after the value */
};

/*
 * Type- and range-checks v for k and stores it in the working copy, taking v->str. On failure
 * writes the "must ..." half of the complaint to why; the caller adds file position or variable.
 */
static bool value_store(struct trackd_config *work, const struct trackd_config *orig,
                        const struct config_key *k, struct value *v, char *why, size_t len)
{
    int found;

    switch (k->type) {
    case KEY_STRING:
        if (v->kind != VAL_STRING)
            break;
        assert(k->min <= 1);
        if (v->len < k->min) {
            snprintf(why, len, "must not be empty");
            return false;
        }
        if (v->len > k->max) {
            snprintf(why, len, "must be at most %" PRIu64 " bytes long", k->max);
            return false;
        }
        key_set_str(work, orig, k, v->str);
        v->str = NULL;
        return true;
    case KEY_BOOL:
        if (v->kind != VAL_BOOL)
            break;
        key_set_int(work, k, v->mag);
        return true;
    case KEY_ENUM:
        if (v->kind != VAL_STRING || (found = enum_find(k, v->str)) < 0)
            break;
        key_set_int(work, k, (uint64_t)found);
        return true;
    case KEY_U32:
    case KEY_U64:
    case KEY_MODE:
        if (v->kind != VAL_INTEGER || v->overflow || (v->neg && v->mag != 0) || v->mag < k->min ||
            v->mag > k->max)
            break;
        key_set_int(work, k, v->mag);
        return true;
    }
    key_expect(k, why, len);
    return false;
}

/* ---- file parser ---- */

struct parser {
    const char *name;
    const char *pos, *end;  /* unparsed text */
    const char *line, *eol; /* current line, eol before any "\r\n" */
    int lineno;
    int section; /* index into sections[], -1 before the first header */
    int section_line[NSECTIONS];
    int key_line[NKEYS];
    struct trackd_config *work;
    const struct trackd_config *orig;
    struct config_error *err;
    char *decoded; /* CONFIG_MAX_LINE bytes: a string's text is never longer than its line */
};

static int parse_fail(struct parser *p, const char *at, const char *fmt, ...) PRINTF_LIKE(3, 4);

static int parse_fail(struct parser *p, const char *at, const char *fmt, ...)
{
    char msg[sizeof p->err->message];
    va_list ap;
    int column = 1;

    /* Columns count characters so editors and humans agree on them. */
    for (const char *s = p->line; s < at; s++)
        if (((unsigned char)*s & 0xC0) != 0x80)
            column++;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return error_set(p->err, p->name, p->lineno, column, "%s", msg);
}

static const char *skip_ws(const char *s, const char *end)
{
    while (s < end && (*s == ' ' || *s == '\t'))
        s++;
    return s;
}

static const char *skip_bare(const char *s, const char *end)
{
    while (s < end && (isalnum((unsigned char)*s) || *s == '_' || *s == '-'))
        s++;
    return s;
}

static int check_comment(struct parser *p, const char *s)
{
    while (s < p->eol) {
        size_t n;
        if (is_control((unsigned char)*s))
            return parse_fail(p, s, "control character U+%04X is not allowed in a comment",
                              (unsigned char)*s);
        if ((n = utf8_len(s, p->eol)) == 0)
            return parse_fail(p, s, "comment contains invalid UTF-8");
        s += n;
    }
    return 0;
}

/* After a header or value only blanks and a comment may follow. */
static int parse_line_end(struct parser *p, const char *s, const char *what)
{
    s = skip_ws(s, p->eol);
    if (s == p->eol)
        return 0;
    if (*s == '#')
        return check_comment(p, s);
    return parse_fail(p, s, "unexpected text after %s", what);
}

static int parse_header(struct parser *p, const char *open)
{
    const char *name, *s = open + 1;
    int len;

    if (s < p->eol && *s == '[')
        return parse_fail(p, open, "arrays of tables ([[...]]) are not supported");
    name = skip_ws(s, p->eol);
    s = skip_bare(name, p->eol);
    len = (int)(s - name);
    if (len == 0) {
        if (s < p->eol && (*s == '"' || *s == '\''))
            return parse_fail(p, s, "quoted section names are not supported");
        return parse_fail(p, s, "expected a section name after \"[\"");
    }
    s = skip_ws(s, p->eol);
    if (s < p->eol && *s == '.')
        return parse_fail(p, s, "dotted section names are not supported");
    if (s == p->eol || *s != ']')
        return parse_fail(p, s, "expected \"]\" after the section name");
    for (size_t i = 0; i < NSECTIONS; i++) {
        if (strlen(sections[i]) != (size_t)len || memcmp(sections[i], name, (size_t)len) != 0)
            continue;
        if (p->section_line[i])
            return parse_fail(p, open, "duplicate section [%s]; it was already opened on line %d",
                              sections[i], p->section_line[i]);
        p->section_line[i] = p->lineno;
        p->section = (int)i;
        return parse_line_end(p, s + 1, "the section header");
    }
    return parse_fail(p, name, "unknown section [%.*s]", len, name);
}

/*
 * Parses a \uXXXX or \UXXXXXXXX escape whose backslash is at esc into p->decoded at *n.
 * Returns the first byte after it, or NULL after reporting the error.
 */
static const char *parse_unicode(struct parser *p, const char *esc, size_t *n)
{
    unsigned digits = esc[1] == 'u' ? 4 : 8;
    const char *s = esc + 2;
    uint32_t cp = 0;

    for (unsigned i = 0; i < digits; i++, s++) {
        if (s == p->eol || digit_value((unsigned char)*s) == 16) {
            parse_fail(p, esc, "escape \"\\%c\" needs %u hex digits", esc[1], digits);
            return NULL;
        }
        cp = cp << 4 | digit_value((unsigned char)*s);
    }
    if (cp == 0) {
        parse_fail(p, esc, "NUL characters are not allowed in strings");
        return NULL;
    }
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
        parse_fail(p, esc, "escape \"%.*s\" is not a Unicode scalar value", (int)(s - esc), esc);
        return NULL;
    }
    *n += utf8_encode(cp, p->decoded + *n);
    return s;
}

/* Parses "..." (escapes, UTF-8) or '...' (verbatim) starting at the opening quote. */
static int parse_string(struct parser *p, const char *open, struct value *v)
{
    static const char escapes[] = "\"\"\\\\n\nt\tr\rb\bf\f";
    const char *s = open + 1, *e;
    char *out = p->decoded;
    size_t n = 0, len;

    for (;;) {
        unsigned char c;
        if (s == p->eol || (*s == '\\' && *open == '"' && s + 1 == p->eol))
            return parse_fail(p, open, "string is missing its closing quote");
        c = (unsigned char)*s;
        if (c == (unsigned char)*open)
            break;
        if (c == '\\' && *open == '"') {
            if (s[1] == 'u' || s[1] == 'U') {
                if ((s = parse_unicode(p, s, &n)) == NULL)
                    return -EINVAL;
                continue;
            }
            /* escapes[] pairs each escape letter with its byte; search only the letters. */
            for (e = escapes; *e && *e != s[1]; e += 2)
                ;
            if (*e) {
                out[n++] = e[1];
                s += 2;
                continue;
            }
            if (isgraph((unsigned char)s[1]))
                return parse_fail(p, s, "invalid escape \"\\%c\" in string", s[1]);
            return parse_fail(p, s, "invalid escape in string");
        }
        if (is_control(c))
            return parse_fail(p, s, "control character U+%04X must be escaped in a string", c);
        if ((len = utf8_len(s, p->eol)) == 0)
            return parse_fail(p, s, "string contains invalid UTF-8");
        memcpy(out + n, s, len);
        n += len;
        s += len;
    }
    v->kind = VAL_STRING;
    v->len = n;
    v->end = s + 1;
    if ((v->str = malloc(n + 1)) == NULL) {
        error_set(p->err, p->name, 0, 0, "out of memory");
        return -ENOMEM;
    }
    memcpy(v->str, out, n);
    v->str[n] = '\0';
    return 0;
}

static bool token_is(const char *s, size_t n, const char *word)
{
    return strlen(word) == n && memcmp(s, word, n) == 0;
}

/*
 * Parses a value starting at s. Unsupported TOML forms are recognised by their first characters so
 * the message names what the user wrote instead of a generic syntax error.
 */
static int parse_value(struct parser *p, const char *s, struct value *v)
{
    const char *t = s, *body = s;
    size_t n, bn;
    const char *why;

    if (s == p->eol || *s == '#')
        return parse_fail(p, s, "expected a value after \"=\"");
    if (p->eol - s >= 3 && (*s == '"' || *s == '\'') && s[1] == *s && s[2] == *s)
        return parse_fail(p, s, "multi-line strings are not supported");
    if (*s == '"' || *s == '\'')
        return parse_string(p, s, v);
    if (*s == '[')
        return parse_fail(p, s, "arrays are not supported");
    if (*s == '{')
        return parse_fail(p, s, "inline tables are not supported");

    while (t < p->eol && (isalnum((unsigned char)*t) || (*t && strchr("_+-.:", *t))))
        t++;
    n = (size_t)(t - s);
    v->end = t;
    if (token_is(s, n, "true") || token_is(s, n, "false")) {
        v->kind = VAL_BOOL;
        v->mag = token_is(s, n, "true");
        return 0;
    }
    if (n > 0 && (*s == '+' || *s == '-'))
        body++;
    bn = n - (size_t)(body - s);
    if (token_is(body, bn, "inf") || token_is(body, bn, "nan"))
        return parse_fail(p, s, "floats are not supported");
    if (bn == 0 || !isdigit((unsigned char)*body))
        return parse_fail(p, s, "expected a value: a quoted string, an integer, true or false");
    if (memchr(s, ':', n) ||
        (n >= 5 && body == s && isdigit((unsigned char)s[1]) && isdigit((unsigned char)s[2]) &&
         isdigit((unsigned char)s[3]) && s[4] == '-'))
        return parse_fail(p, s, "dates and times are not supported");
    if (!(bn > 1 && body[0] == '0' && body[1] == 'x') &&
        (memchr(s, '.', n) || memchr(s, 'e', n) || memchr(s, 'E', n)))
        return parse_fail(p, s, "floats are not supported");
    v->kind = VAL_INTEGER;
    if ((why = int_parse(s, n, false, &v->mag, &v->neg, &v->overflow)) == NULL)
        return 0;
    return parse_fail(p, s, "\"%.*s\" is not a valid integer: %s", (int)(n < 64 ? n : 64), s, why);
}

static int parse_keyval(struct parser *p, const char *key)
{
    const char *s = skip_bare(key, p->eol), *at;
    int klen = (int)(s - key), rc;
    const char *section;
    struct value v = {0};
    char why[160];

    if (klen == 0 && s < p->eol && (*s == '"' || *s == '\''))
        return parse_fail(p, s, "quoted keys are not supported");
    s = skip_ws(s, p->eol);
    if (klen > 0 && s < p->eol && *s == '.')
        return parse_fail(p, s, "dotted keys are not supported");
    if (klen == 0 || s == p->eol || *s != '=')
        return parse_fail(p, key, "expected \"key = value\"");
    if (p->section < 0)
        return parse_fail(p, key, "key \"%.*s\" must be inside a section such as [agent]", klen,
                          key);
    section = sections[p->section];
    for (size_t i = 0; i < NKEYS; i++) {
        const struct config_key *k = &keys[i];
        if (strcmp(k->section, section) != 0 || !token_is(key, (size_t)klen, k->name))
            continue;
        if (p->key_line[i])
            return parse_fail(p, key, "duplicate key \"%s\" in [%s]; it was already set on line %d",
                              k->name, section, p->key_line[i]);
        p->key_line[i] = p->lineno;
        at = skip_ws(s + 1, p->eol);
        rc = parse_value(p, at, &v);
        if (rc == 0 && !value_store(p->work, p->orig, k, &v, why, sizeof why))
            rc = parse_fail(p, at, "value for %s.%s %s", k->section, k->name, why);
        free(v.str);
        return rc ? rc : parse_line_end(p, v.end, "the value");
    }
    return parse_fail(p, key, "unknown key \"%.*s\" in [%s]", klen, key, section);
}

static int parse_text(struct parser *p)
{
    /* Editors on some systems prepend a UTF-8 byte order mark; it carries no meaning. */
    if (p->end - p->pos >= 3 && memcmp(p->pos, "\xEF\xBB\xBF", 3) == 0)
        p->pos += 3;
    while (p->pos < p->end) {
        const char *nl = memchr(p->pos, '\n', (size_t)(p->end - p->pos)), *s;
        int rc = 0;

        p->lineno++;
        p->line = p->pos;
        p->eol = nl ? nl : p->end;
        p->pos = nl ? nl + 1 : p->end;
        if (p->eol > p->line && p->eol[-1] == '\r')
            p->eol--;
        if (p->eol - p->line > CONFIG_MAX_LINE)
            return parse_fail(p, p->line, "line is longer than %d bytes", CONFIG_MAX_LINE);
        s = skip_ws(p->line, p->eol);
        if (s == p->eol)
            continue;
        if (*s == '#')
            rc = check_comment(p, s);
        else if (*s == '[')
            rc = parse_header(p, s);
        else
            rc = parse_keyval(p, s);
        if (rc)
            return rc;
    }
    return 0;
}

/* ---- public API ---- */

int config_init(struct trackd_config *c)
{
    int rc = 0;

    memset(c, 0, sizeof *c);
    for (size_t i = 0; i < NKEYS; i++) {
        const struct config_key *k = &keys[i];
        if (k->type != KEY_STRING) {
            key_set_int(c, k, k->int_default);
        } else if ((*(char **)field_of(c, k) = strdup(k->str_default)) == NULL) {
            rc = -ENOMEM;
        }
    }
    return rc;
}

int config_load_string(struct trackd_config *c, const char *text, size_t len, const char *name,
                       struct config_error *err)
{
    struct config_error scratch;
    struct trackd_config work = *c;
    struct parser p;
    int rc;

    if (!err)
        err = &scratch;
    if (!name)
        name = "<string>";
    memset(err, 0, sizeof *err);
    if (len > CONFIG_MAX_FILE) {
        error_set(err, name, 0, 0, "file is larger than %d bytes", CONFIG_MAX_FILE);
        return -EFBIG;
    }
    memset(&p, 0, sizeof p);
    p.name = name;
    p.pos = text ? text : "";
    p.end = p.pos + (text ? len : 0);
    p.section = -1;
    p.work = &work;
    p.orig = c;
    p.err = err;
    p.decoded = malloc(CONFIG_MAX_LINE);
    if (!p.decoded) {
        error_set(err, name, 0, 0, "out of memory");
        return -ENOMEM;
    }
    rc = parse_text(&p);
    free(p.decoded);
    config_txn_end(c, &work, rc == 0);
    return rc;
}

int config_load_file(struct trackd_config *c, const char *path, struct config_error *err)
{
    struct config_error scratch;
    char *buf = NULL;
    FILE *f;
    size_t n;
    int rc;

    if (!err)
        err = &scratch;
    memset(err, 0, sizeof *err);
    f = fopen(path, "rb");
    if (!f) {
        rc = -errno;
        error_set(err, path, 0, 0, "cannot open file: %s", strerror(-rc));
        return rc;
    }
    /* One byte over the limit tells a file of exactly 1 MiB from a larger one. */
    buf = malloc(CONFIG_MAX_FILE + 1);
    if (!buf) {
        error_set(err, path, 0, 0, "out of memory");
        rc = -ENOMEM;
        goto out;
    }
    errno = 0;
    n = fread(buf, 1, CONFIG_MAX_FILE + 1, f);
    if (ferror(f)) {
        rc = errno ? -errno : -EIO;
        error_set(err, path, 0, 0, "cannot read file: %s", strerror(-rc));
    } else if (n > CONFIG_MAX_FILE) {
        error_set(err, path, 0, 0, "file is larger than %d bytes", CONFIG_MAX_FILE);
        rc = -EFBIG;
    } else {
        rc = config_load_string(c, buf, n, path, err);
    }
out:
    free(buf);
    fclose(f);
    return rc;
}

/* Matches name[0..n) against the upper-cased lower_word; prefix allows a trailing "_..." */
static bool env_word(const char *name, size_t n, const char *lower_word, bool prefix)
{
    size_t wl = strlen(lower_word);

    if (n < wl || (prefix ? n == wl || name[wl] != '_' : n != wl))
        return false;
    for (size_t i = 0; i < wl; i++)
        if (name[i] != toupper((unsigned char)lower_word[i]))
            return false;
    return true;
}

/* Applies one "NAME=VALUE" entry to the working copy if NAME is one of ours. */
static int env_apply_one(struct trackd_config *work, const struct trackd_config *orig,
                         const char *entry, struct config_error *err)
{
    const char *eq = strchr(entry, '='), *val, *rest = entry + 7;
    const struct config_key *k = NULL;
    const char *section = NULL;
    size_t rest_len;
    char name[sizeof err->where], why[160];
    struct value v = {0};
    bool stored;

    if (!eq || strncmp(entry, "TRACKD_", 7) != 0)
        return 0;
    val = eq + 1;
    rest_len = (size_t)(eq - rest);
    for (size_t i = 0; i < NSECTIONS && !section; i++)
        if (env_word(rest, rest_len, sections[i], true))
            section = sections[i];
    if (!section)
        return 0; /* other TRACKD_* names belong to other tools, e.g. the client shim */
    rest += strlen(section) + 1;
    rest_len -= strlen(section) + 1;
    for (size_t i = 0; i < NKEYS && !k; i++)
        if (strcmp(keys[i].section, section) == 0 && env_word(rest, rest_len, keys[i].name, false))
            k = &keys[i];
    snprintf(name, sizeof name, "%.*s", (int)(eq - entry), entry);
    if (!k)
        return error_set(err, name, 0, 0, "unknown setting: [%s] has no such key", section);

    if (k->type == KEY_BOOL) {
        bool t = strcmp(val, "true") == 0 || strcmp(val, "1") == 0;
        if (t || strcmp(val, "false") == 0 || strcmp(val, "0") == 0) {
            v.kind = VAL_BOOL;
            v.mag = t;
        }
    } else if (k->type == KEY_STRING || k->type == KEY_ENUM) {
        v.kind = VAL_STRING;
        v.len = strlen(val);
        if ((v.str = strdup(val)) == NULL) {
            error_set(err, name, 0, 0, "out of memory");
            return -ENOMEM;
        }
    } else {
        bool legacy_octal = k->type == KEY_MODE;
        if (int_parse(val, strlen(val), legacy_octal, &v.mag, &v.neg, &v.overflow) == NULL)
            v.kind = VAL_INTEGER;
    }
    stored = value_store(work, orig, k, &v, why, sizeof why);
    free(v.str);
    return stored ? 0 : error_set(err, name, 0, 0, "%s", why);
}

int config_apply_env(struct trackd_config *c, char *const *envp, struct config_error *err)
{
    struct config_error scratch;
    struct trackd_config work = *c;
    int rc = 0;

    if (!err)
        err = &scratch;
    memset(err, 0, sizeof *err);
    for (char *const *e = envp; e && *e && rc == 0; e++)
        rc = env_apply_one(&work, c, *e, err);
    config_txn_end(c, &work, rc == 0);
    return rc;
}

int config_format_error(const struct config_error *err, char *buf, size_t len)
{
    if (err->line > 0)
        return snprintf(buf, len, "%s:%d:%d: %s", err->where, err->line, err->column, err->message);
    return snprintf(buf, len, "%s: %s", err->where, err->message);
}

/* ---- dump ---- */

static void dump_quoted(FILE *out, const char *s)
{
    fputc('"', out);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        switch (c) {
        case '"': fputs("\\\"", out); break;
        case '\\': fputs("\\\\", out); break;
        case '\n': fputs("\\n", out); break;
        case '\t': fputs("\\t", out); break;
        case '\r': fputs("\\r", out); break;
        default:
            if (is_control(c))
                fprintf(out, "\\u%04X", c);
            else
                fputc(c, out);
        }
    }
    fputc('"', out);
}

static bool dsn_is_uri(const char *s)
{
    return strncmp(s, "postgresql://", 13) == 0 || strncmp(s, "postgres://", 11) == 0;
}

static char *append(char *o, const char *s, size_t n)
{
    memcpy(o, s, n);
    return o + n;
}

/*
 * Copies a keyword/value DSN with password values replaced. Values follow libpq's rules
 * (single quotes, backslash escapes). A dbname that is itself a connection string is masked
 * whole: libpq expands it, so it may carry a password too.
 */
static char *redact_keywords(const char *s, char *o)
{
    while (*s) {
        const char *key, *val, *hit;
        size_t klen;
        bool mask;
        while (isspace((unsigned char)*s))
            *o++ = *s++;
        for (key = s; *s && *s != '=' && !isspace((unsigned char)*s);)
            *o++ = *s++;
        klen = (size_t)(s - key);
        while (isspace((unsigned char)*s))
            *o++ = *s++;
        if (*s != '=')
            continue;
        *o++ = *s++;
        while (isspace((unsigned char)*s))
            *o++ = *s++;
        val = s;
        if (*s == '\'') {
            for (s++; *s && *s != '\''; s++)
                if (*s == '\\' && s[1])
                    s++;
            if (*s)
                s++;
        } else {
            for (; *s && !isspace((unsigned char)*s); s++)
                if (*s == '\\' && s[1])
                    s++;
        }
        hit = strpbrk(val, "=@");
        mask = token_is(key, klen, "password") || (token_is(key, klen, "dbname") && hit && hit < s);
        o = mask ? append(o, "****", 4) : append(o, val, (size_t)(s - val));
    }
    return o;
}

/*
 * Copies a postgresql:// URI with the user:password@ password and any password= query parameter
 * replaced. The credentials end at the last '@' before the query, which masks more than libpq
 * would read as a password when the URI is malformed, never less.
 */
static char *redact_uri(const char *s, char *o)
{
    const char *auth = strstr(s, "://") + 3, *query = auth + strcspn(auth, "?");
    const char *at = NULL, *colon;

    o = append(o, s, (size_t)(auth - s));
    for (const char *t = auth; t < query; t++)
        if (*t == '@')
            at = t;
    colon = at ? memchr(auth, ':', (size_t)(at - auth)) : NULL;
    if (colon) {
        o = append(o, auth, (size_t)(colon + 1 - auth));
        o = append(o, "****", 4);
        auth = at;
    }
    o = append(o, auth, (size_t)(query - auth));
    for (s = query; *s;) {
        *o++ = *s++;
        if ((s[-1] == '?' || s[-1] == '&') && strncmp(s, "password=", 9) == 0) {
            o = append(o, "password=****", 13);
            s += 9 + strcspn(s + 9, "&");
        }
    }
    return o;
}

/* Returns the DSN with passwords masked, owned by the caller; NULL when out of memory. */
static char *dsn_redact(const char *dsn)
{
    /* Each mask replaces a value behind at least "password=" or ":" plus "@", so 2n + 16 holds. */
    char *out = malloc(2 * strlen(dsn) + 16), *end;

    if (!out)
        return NULL;
    end = dsn_is_uri(dsn) ? redact_uri(dsn, out) : redact_keywords(dsn, out);
    *end = '\0';
    return out;
}

const char *config_log_level_name(int level)
{
    return level >= CONFIG_LOG_ERROR && level <= CONFIG_LOG_DEBUG ? level_names[level] : "info";
}

const char *config_fsync_name(int fsync)
{
    return fsync >= CONFIG_FSYNC_ALWAYS && fsync <= CONFIG_FSYNC_NEVER ? fsync_names[fsync]
                                                                       : "interval";
}

void config_diff(const struct trackd_config *a, const struct trackd_config *b,
                 void (*cb)(void *ctx, const char *section, const char *name), void *ctx)
{
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const struct config_key *k = &keys[i];
        bool same;
        if (k->type == KEY_STRING) {
            const char *x = *(char *const *)field_of(a, k), *y = *(char *const *)field_of(b, k);
            same = strcmp(x ? x : "", y ? y : "") == 0;
        } else {
            same = key_get_int(a, k) == key_get_int(b, k);
        }
        if (!same)
            cb(ctx, k->section, k->name);
    }
}

int config_check(const struct trackd_config *c, char *msg, size_t msglen)
{
    const char *uri = c->backend_uri ? c->backend_uri : "";
    if (strstr(uri, "://") != NULL) {
        char *masked = malloc(2 * strlen(uri) + 16);
        if (masked == NULL)
            return -ENOMEM;
        *redact_uri(uri, masked) = '\0';
        bool secret = strcmp(masked, uri) != 0;
        free(masked);
        if (secret) {
            snprintf(msg, msglen,
                     "mlflow.backend_uri carries a password (user:password@ or password=), and "
                     "the agent announces it to every client: leave it out of the URI and give "
                     "readers their own credentials (~/.pgpass or PGPASSWORD)");
            return -EINVAL;
        }
    }
    return 0;
}

void config_dump(const struct trackd_config *c, FILE *out)
{
    const char *section = NULL;

    for (size_t i = 0; i < NKEYS; i++) {
        const struct config_key *k = &keys[i];
        if (!section || strcmp(section, k->section) != 0) {
            fprintf(out, "%s[%s]\n", section ? "\n" : "", k->section);
            section = k->section;
        }
        fprintf(out, "# %s\n%s = ", k->doc, k->name);
        switch (k->type) {
        case KEY_STRING: {
            const char *s = *(char **)field_of(c, k);
            char *masked = NULL;
            if (s && (k->flags & KEY_SECRET_DSN))
                s = masked = dsn_redact(s); /* NULL here prints "****", never the raw DSN */
            dump_quoted(out, s ? s : (k->flags & KEY_SECRET_DSN) ? "****" : "");
            free(masked);
            break;
        }
        case KEY_ENUM: dump_quoted(out, k->names[key_get_int(c, k)]); break;
        case KEY_MODE: fprintf(out, "0o%03" PRIo64, key_get_int(c, k)); break;
        case KEY_BOOL: fputs(key_get_int(c, k) ? "true" : "false", out); break;
        case KEY_U32:
        case KEY_U64: fprintf(out, "%" PRIu64, key_get_int(c, k)); break;
        }
        fputc('\n', out);
    }
}

void config_free(struct trackd_config *c)
{
    for (size_t i = 0; i < NKEYS; i++) {
        char **slot;
        if (keys[i].type != KEY_STRING)
            continue;
        slot = field_of(c, &keys[i]);
        free(*slot);
        *slot = NULL;
    }
}
