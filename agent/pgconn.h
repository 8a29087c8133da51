/*
 * PostgreSQL plumbing shared by the start-up check and the writer: libpq
 * connection parameters from the configuration (the password stays out of
 * every log line), SQLSTATE classification, and the schema check: blocking
 * once before the event loop starts, and non-blocking in the writer on every
 * new connection (after an offline start or a failover).
 */
#ifndef TRACKD_PGCONN_H
#define TRACKD_PGCONN_H

#include <libpq-fe.h>
#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct trackd_config;

/* Alembic revisions of MLflow's schema this build is tested with. */
extern const char *const pgconn_tested_revisions[];

/*
 * libpq keyword/value arrays for PQconnectStartParams(..., expand_dbname=1). The first n_base
 * entries come from the configuration; pgconn_params_target() appends host, hostaddr and port
 * after them (libpq keeps the last value of a repeated keyword, so they override the DSN's).
 */
struct pgconn_params {
    const char *keys[10];
    const char *values[10];
    size_t n_base;
    char timeout[16];
    char password[1024]; /* from [postgres] password_file; never logged */
};

/*
 * One host of the DSN's host list with its port, as libpq pairs them: host, hostaddr and port
 * are comma-separated lists, and a single port applies to every host. Strings point into the
 * owning pgconn_targets.
 */
struct pgconn_target {
    const char *host;     /* a name, a socket directory ("/..." or "@..."), or NULL */
    const char *hostaddr; /* a numeric address given in the DSN, or NULL */
    const char *port;     /* NULL: libpq's default */
};

struct pgconn_targets {
    struct pgconn_target *v; /* owned */
    size_t n;                /* 0: the DSN names no host; libpq picks (PGHOST, service, socket) */
    unsigned timeout_ms;     /* the DSN's connect_timeout in ms (libpq's 2 s minimum), or 0 */
    char *strings;           /* owned: the lists, split in place */
};

/* Fills p from cfg; reads password_file. Returns 0 or -errno with msg set. */
/*
 * Checks that libpq can parse dsn and registers its password with
 * log_add_secret(). libpq's parse errors quote pieces of the string, which may
 * be the password, so msg gives the reason with every quoted piece elided.
 */
int pgconn_dsn_check(const char *dsn, char *msg, size_t msglen);
int pgconn_params_init(struct pgconn_params *p, const struct trackd_config *cfg, char *msg,
                       size_t msglen);
void pgconn_params_clear(struct pgconn_params *p);

/*
 * Splits dsn's host, hostaddr and port lists into targets, with libpq's pairing rules (the
 * lists have equal lengths, except a single port for all). A DSN without host and hostaddr
 * gives n = 0, as does one with an empty entry in its host list (libpq's default socket
 * directory is not known here): libpq then walks its own list. Returns 0, or -EINVAL with msg
 * set when the lists do not pair, -ENOMEM. Free with pgconn_targets_free().
 */
int pgconn_targets_parse(const char *dsn, struct pgconn_targets *t, char *msg, size_t msglen);
void pgconn_targets_free(struct pgconn_targets *t);
/* True when host is a Unix socket directory (or abstract socket), not a name to resolve. */
int pgconn_host_is_socket(const char *host);
/* Sets p's overrides to one address; NULL leaves that keyword to the DSN. Borrows the strings. */
void pgconn_params_target(struct pgconn_params *p, const char *host, const char *hostaddr,
                          const char *port);

/*
 * What a failed transaction means for its events, by SQLSTATE class (PostgreSQL's
 * "Appendix A. PostgreSQL Error Codes"). Only class 22 (data exception) and 23 (integrity
 * constraint violation) say that a row of the transaction is bad: those ranges are split
 * until the row is isolated and rejected. Every other state, known or not, says nothing
 * about the data (a lost connection, a timeout, a lock, a full disk, a server bug): the
 * range is retried with backoff, without limit, and nothing is rejected.
 */
enum pgconn_class {
    PGCONN_RETRY,  /* not the data's fault: retry the same range later */
    PGCONN_ISOLATE /* class 22 or 23: some row in the range is bad */
};

/* Classifies a SQLSTATE (NULL or "" = no state: the connection failed). */
enum pgconn_class pgconn_classify(const char *sqlstate);

/* A retried error's class, for counters and the operator. */
struct pgconn_error_class {
    const char *code;   /* "08", "57", ..., or "other" */
    const char *name;   /* PostgreSQL's name of the class */
    const char *advice; /* what the operator should look at, one sentence */
    uint64_t *counter;  /* its counter in stats (db_errors_class_*) */
};

/* The class of sqlstate (NULL or "" = a lost connection, class 08); never NULL. */
const struct pgconn_error_class *pgconn_error_class(const char *sqlstate);

/*
 * The schema check: one simple query of PGCONN_CHECK_RESULTS statements (alembic_version, the
 * columns and the unique indexes of the tables trackd writes), sent by the start-up check and
 * by the writer on every new connection. pgconn_check_results judges their results (any may
 * be NULL or an error): 0 with *out filled when every column trackd writes is there with a
 * usable type and every unique key its statements rely on exists, whatever the revision; else
 * -EINVAL with a sentence naming the missing or different column or key and what to do.
 */
#define PGCONN_CHECK_RESULTS 3
extern const char pgconn_check_sql[];
struct pgconn_schema {
    char revision[64];
    bool tested;    /* on the tested list (pgconn_tested_revisions) or in allowed_revisions */
    bool workspace; /* experiments.workspace exists (MLflow 3.10 on): enum batch_schema */
    /* Code points a tag value keeps: tags.value's length, at most VALIDATE_TAG_VALUE_MAX (5000
     * before MLflow 2.17, 8000 from it). */
    unsigned tag_value_max;
};
/* The shortest tags.value accepted: MLflow's limit since 1.x, varchar(5000). */
#define PGCONN_TAG_VALUE_MIN 5000
int pgconn_check_results(const struct trackd_config *cfg, const char *dbname,
                         PGresult *const res[PGCONN_CHECK_RESULTS], struct pgconn_schema *out,
                         char *msg, size_t msglen);
/* Logs what a passed check found, once per revision and process: info for a tested revision,
 * else one warning naming it. */
void pgconn_log_schema(const struct pgconn_schema *s);
/* The tested revisions, comma-separated. */
const char *pgconn_tested_list(void);

/* pgconn_check_schema's results, in the project's 0 / -errno convention. */
enum {
    PGCONN_CHECK_OK = 0,
    PGCONN_CHECK_FAILED = -EINVAL,        /* the schema or configuration is wrong */
    PGCONN_CHECK_UNREACHABLE = -ENOTCONN, /* no connection: the agent starts offline */
};

/*
 * Connects (blocking, bounded by [postgres] connect_timeout_ms) and runs the schema check.
 * Returns PGCONN_CHECK_OK, PGCONN_CHECK_FAILED (the schema or configuration is wrong) or
 * PGCONN_CHECK_UNREACHABLE (no connection: the agent starts offline), with msg set.
 */
int pgconn_check_schema(const struct trackd_config *cfg, char *msg, size_t msglen);

/* Logs libpq notices at debug level instead of printing them to stderr. */
void pgconn_notice(void *arg, const char *message);

#endif
