/*
 * config — the agent's settings: one key table (name, type, default, range, doc) drives agent.toml,
 * TRACKD_* overrides, config_dump() and config_diff(). toml.c reads the file's syntax and hands
 * each [section], key and value here. Loads work on a copy of the struct and commit only on
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

#include "toml.h"

#define CONFIG_MAX_FILE (1024 * 1024)
#define CONFIG_MAX_LINE TOML_MAX_LINE /* a string value is never longer than its line */
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
    NUM("postgres", "writer_connections", KEY_U32, pg_writers, 2, 1, CONFIG_MAX_WRITERS,
        "Connections that write events; a run's events go through one of them at a time"),
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
    NUM("batch", "max_pending_bytes", KEY_U64, max_pending_bytes, 20971520, 1048576,
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

/*
 * Type- and range-checks v for k and stores it in the working copy (a string as a copy). v NULL
 * is a value of no type k could take. Returns 0, -ENOMEM, or -EINVAL after writing the "must ..."
 * half of the complaint to why; the caller adds file position or variable.
 */
static int value_store(struct trackd_config *work, const struct trackd_config *orig,
                       const struct config_key *k, const struct toml_value *v, char *why,
                       size_t len)
{
    int found;
    char *copy;

    switch (k->type) {
    case KEY_STRING:
        if (!v || v->type != TOML_STRING)
            break;
        assert(k->min <= 1);
        if (v->len < k->min) {
            snprintf(why, len, "must not be empty");
            return -EINVAL;
        }
        if (v->len > k->max) {
            snprintf(why, len, "must be at most %" PRIu64 " bytes long", k->max);
            return -EINVAL;
        }
        if ((copy = strndup(v->str, v->len)) == NULL)
            return -ENOMEM;
        key_set_str(work, orig, k, copy);
        return 0;
    case KEY_BOOL:
        if (!v || v->type != TOML_BOOL)
            break;
        key_set_int(work, k, v->mag);
        return 0;
    case KEY_ENUM:
        if (!v || v->type != TOML_STRING || (found = enum_find(k, v->str)) < 0)
            break;
        key_set_int(work, k, (uint64_t)found);
        return 0;
    case KEY_U32:
    case KEY_U64:
    case KEY_MODE:
        if (!v || v->type != TOML_INTEGER || v->overflow || (v->neg && v->mag != 0) ||
            v->mag < k->min || v->mag > k->max)
            break;
        key_set_int(work, k, v->mag);
        return 0;
    }
    key_expect(k, why, len);
    return -EINVAL;
}

/* ---- file ---- */

/* A file load's state, the ctx of the toml_parse() callbacks. */
struct file_load {
    struct trackd_config *work;
    const struct trackd_config *orig;
    int section; /* index into sections[], -1 before the first header */
    int section_line[NSECTIONS];
    int key_line[NKEYS];
    const struct config_key *key; /* the key whose value comes next */
};

static int file_table(void *ctx, struct toml_reader *r, const char *open, const char *name,
                      size_t len)
{
    struct file_load *f = ctx;

    for (size_t i = 0; i < NSECTIONS; i++) {
        if (!toml_name_is(name, len, sections[i]))
            continue;
        if (f->section_line[i])
            return toml_fail(r, open, "duplicate section [%s]; it was already opened on line %d",
                             sections[i], f->section_line[i]);
        f->section_line[i] = toml_line(r);
        f->section = (int)i;
        return 0;
    }
    return toml_fail(r, name, "unknown section [%.*s]", (int)len, name);
}

static int file_key(void *ctx, struct toml_reader *r, const char *key, size_t len)
{
    struct file_load *f = ctx;
    const char *section;

    if (f->section < 0)
        return toml_fail(r, key, "key \"%.*s\" must be inside a section such as [agent]", (int)len,
                         key);
    section = sections[f->section];
    for (size_t i = 0; i < NKEYS; i++) {
        const struct config_key *k = &keys[i];
        if (strcmp(k->section, section) != 0 || !toml_name_is(key, len, k->name))
            continue;
        if (f->key_line[i])
            return toml_fail(r, key, "duplicate key \"%s\" in [%s]; it was already set on line %d",
                             k->name, section, f->key_line[i]);
        f->key_line[i] = toml_line(r);
        f->key = k;
        return 0;
    }
    return toml_fail(r, key, "unknown key \"%.*s\" in [%s]", (int)len, key, section);
}

static int file_value(void *ctx, struct toml_reader *r, const struct toml_value *v)
{
    struct file_load *f = ctx;
    const struct config_key *k = f->key;
    char why[160];
    int rc = value_store(f->work, f->orig, k, v, why, sizeof why);

    if (rc == -EINVAL)
        return toml_fail(r, v->at, "value for %s.%s %s", k->section, k->name, why);
    return rc;
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
    static const struct toml_handler handler = {file_table, file_key, file_value};
    struct config_error scratch;
    struct trackd_config work = *c;
    struct file_load f;
    struct toml_error terr;
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
    memset(&f, 0, sizeof f);
    f.work = &work;
    f.orig = c;
    f.section = -1;
    rc = toml_parse(text ? text : "", text ? len : 0, &handler, &f, &terr);
    if (rc == -ENOMEM)
        error_set(err, name, 0, 0, "out of memory");
    else if (rc != 0)
        error_set(err, name, terr.line, terr.column, "%s", terr.message);
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
    struct toml_value v = {0};
    const struct toml_value *have = NULL; /* &v once val is of a type k may take */
    int rc;

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
            v.type = TOML_BOOL;
            v.mag = t;
            have = &v;
        }
    } else if (k->type == KEY_STRING || k->type == KEY_ENUM) {
        v.type = TOML_STRING;
        v.str = val;
        v.len = strlen(val);
        have = &v;
    } else {
        bool legacy_octal = k->type == KEY_MODE;
        if (toml_int_parse(val, strlen(val), legacy_octal, &v) == NULL)
            have = &v;
    }
    rc = value_store(work, orig, k, have, why, sizeof why);
    if (rc == -ENOMEM) {
        error_set(err, name, 0, 0, "out of memory");
        return rc;
    }
    return rc ? error_set(err, name, 0, 0, "%s", why) : 0;
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
        mask = toml_name_is(key, klen, "password") ||
               (toml_name_is(key, klen, "dbname") && hit && hit < s);
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
            toml_write_string(out, s ? s : (k->flags & KEY_SECRET_DSN) ? "****" : "");
            free(masked);
            break;
        }
        case KEY_ENUM: toml_write_string(out, k->names[key_get_int(c, k)]); break;
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
