/*
 * config — the agent's settings: defaults, agent.toml, TRACKD_* environment overrides.
 *
 * One static key table in config.c drives parsing, environment overrides, defaults and
 * config_dump(), so adding a setting means adding one table row and one struct field.
 * The file format is a strict TOML subset parsed by hand; see toml.h for what is accepted.
 */
#ifndef TRACKD_CONFIG_H
#define TRACKD_CONFIG_H

#include <stddef.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/* "0.1.0": the CMake project's version, which the Python package takes too (pyproject.toml). */
extern const char trackd_version[];

enum config_log_level { CONFIG_LOG_ERROR, CONFIG_LOG_WARN, CONFIG_LOG_INFO, CONFIG_LOG_DEBUG };
/* [journal] fsync; journaler.c asserts these equal enum journal_fsync. */
enum config_fsync { CONFIG_FSYNC_ALWAYS, CONFIG_FSYNC_INTERVAL, CONFIG_FSYNC_NEVER };

/*
 * Every char * field is owned by the struct: malloc'd by config_init() or a successful load, and
 * released by config_free(). Callers read the fields and must not free or replace them.
 */
/* The most [postgres] writer_connections may be. */
#define CONFIG_MAX_WRITERS 16

struct trackd_config {
    /* [agent] */
    char *socket_path;                /* Unix socket the agent listens on */
    unsigned socket_mode;             /* file mode of the socket, 0..0777 */
    char *socket_group;               /* group name or numeric gid; "" = the agent's own group */
    uint32_t max_connections;         /* concurrent client connections */
    uint32_t max_connections_per_uid; /* of those, from one uid */
    uint32_t max_frame_bytes;         /* hard cap on one frame body */
    bool trust_client_user;           /* mlflow.user from the client rather than SO_PEERCRED */
    char *allowed_uids;               /* comma-separated names or uids; "" = no uid rule */
    char *allowed_gids;               /* comma-separated names or gids; "" = no gid rule */
    char *shared_gids;                /* groups whose members may write each other's runs */
    bool open_unowned_runs;           /* anyone may write runs trackd did not start */
    uint32_t hello_timeout_ms;
    uint32_t frame_timeout_ms;      /* an incomplete frame may take this long */
    uint32_t idle_timeout_ms;       /* 0 = never */
    uint32_t max_frames_per_sec;    /* per connection; 0 = no limit */
    uint32_t max_reply_bytes;       /* queued replies per connection */
    uint64_t max_read_buffer_bytes; /* incomplete frames, all connections */
    int log_level;                  /* enum config_log_level */
    uint32_t shutdown_grace_ms;     /* drain time on SIGTERM */
    /* [postgres] */
    char *pg_dsn;           /* libpq keyword string or URI; may hold a password */
    char *pg_password_file; /* "" = none; first line is the password */
    uint32_t pg_connect_timeout_ms;
    uint32_t pg_writers; /* writer connections; runs are spread over them by id */
    bool seed_views;     /* create the mlflow_* views; `trackd views drop` removes them */
    /* [mlflow] */
    char *artifact_root;     /* experiment artifact_location = root + "/" + experiment_id */
    char *allowed_revisions; /* comma-separated extra alembic revisions; "" = none */
    char *backend_uri;       /* announced to clients in the welcome; "" = none; no password */
    char *mlflow_server_url; /* for mlflow-artifacts: URIs without a host; "" = none */
    char *allowed_roots;   /* comma-separated artifact roots besides the defaults (destination.h) */
    char *s3_endpoint_url; /* S3-compatible endpoint; "" = from the environment, or AWS */
    char *s3_region;
    char *s3_access_key_id;
    char *s3_secret_file; /* the secret key's file; never the key itself */
    /* [journal] */
    char *journal_dir;
    int journal_fsync; /* enum config_fsync */
    uint32_t journal_fsync_interval_ms;
    uint64_t journal_quota_bytes;
    uint64_t journal_segment_bytes;
    /* [batch] */
    uint32_t batch_max_rows;    /* rows per database transaction */
    uint64_t batch_max_bytes;   /* bytes per database transaction */
    uint32_t batch_max_age_ms;  /* oldest buffered event waits at most this long */
    uint64_t max_pending_bytes; /* buffered-event memory before backpressure */
};

/*
 * Detail for a failed load. where is the file name given to the load function or the
 * environment variable name; line and column are 1-based and 0 when not applicable (environment
 * errors, I/O errors, file too large). Columns count UTF-8 characters, not bytes.
 * message is a full sentence without a trailing period.
 */
struct config_error {
    char where[256];
    int line;
    int column;
    char message[512];
};

/*
 * Fills c with the defaults. Any previous contents are overwritten, not freed.
 * Returns 0, or -ENOMEM (some strings are then NULL; config_free() still releases the rest).
 */
int config_init(struct trackd_config *c);

/*
 * Reads path (at most 1 MiB) and applies it to c, which must have been initialised. The update is
 * all or nothing: on error c is unchanged. err may be NULL.
 * Returns 0, -EINVAL for a syntax or value error, -EFBIG for a file over 1 MiB, -ENOMEM, or the
 * negative errno of open/read (-ENOENT, -EACCES, -EISDIR, ...).
 */
int config_load_file(struct trackd_config *c, const char *path, struct config_error *err);

/*
 * As config_load_file() for text already in memory; text need not be NUL-terminated.
 * name (borrowed; NULL means "<string>") is what error messages call the source.
 */
int config_load_string(struct trackd_config *c, const char *text, size_t len, const char *name,
                       struct config_error *err);

/*
 * Applies TRACKD_<SECTION>_<KEY> overrides from envp (borrowed, NULL-terminated "NAME=VALUE"
 * array like environ; NULL means none). Strings are taken verbatim; integers accept decimal, 0o,
 * 0x and _ separators, and socket_mode also a leading-0 octal ("0660"). A TRACKD_<SECTION>_ name
 * for a known section but unknown key is an error, so typos do not pass silently; other TRACKD_*
 * names are ignored because other tools share the prefix. All or nothing, like the loaders.
 * Returns 0, -EINVAL or -ENOMEM.
 */
int config_apply_env(struct trackd_config *c, char *const *envp, struct config_error *err);

/*
 * Writes "where:line:column: message", or "where: message" when line is 0, to buf (always
 * NUL-terminated when len > 0). Returns the length the full text needs, like snprintf.
 */
int config_format_error(const struct config_error *err, char *buf, size_t len);

/*
 * Writes every setting as TOML that config_load_string() accepts, each preceded by its doc
 * comment. The password in postgres.dsn (keyword password=..., URI user:password@ and
 * ?password=) is written as "****"; the password file's content is never read.
 */
void config_dump(const struct trackd_config *c, FILE *out);

/*
 * Checks between keys, after loading: journal.fsync is one of its words, and mlflow.backend_uri
 * carries no password (user:password@ or password=): the agent sends it to every client.
 * Returns 0, or -EINVAL with a sentence in msg naming the key and what to do.
 */
int config_check(const struct trackd_config *c, char *msg, size_t msglen);

/* "error", "warn", "info" or "debug". */
const char *config_log_level_name(int level);
/* "always", "interval" or "never". */
const char *config_fsync_name(int fsync);

/*
 * Calls cb for every key whose value differs between a and b ("agent", "log_level"), in
 * table order. For SIGHUP: which settings a reloaded file changes.
 */
void config_diff(const struct trackd_config *a, const struct trackd_config *b,
                 void (*cb)(void *ctx, const char *section, const char *name), void *ctx);

/* Frees the strings of c and sets them to NULL; safe to call twice. */
void config_free(struct trackd_config *c);

#endif
