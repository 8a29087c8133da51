/*
 * PostgreSQL plumbing shared by the start-up check and the writer: libpq
 * connection parameters from the configuration (the password stays out of
 * every log line), SQLSTATE classification, and the blocking schema check
 * that runs once before the event loop starts.
 */
#ifndef TRACKD_PGCONN_H
#define TRACKD_PGCONN_H

#include <libpq-fe.h>
#include <stddef.h>

struct trackd_config;

/* Alembic revisions of MLflow's schema this build is tested with. */
extern const char *const pgconn_tested_revisions[];

/* libpq keyword/value arrays for PQconnectStartParams(..., expand_dbname=1). */
struct pgconn_params {
    const char *keys[5];
    const char *values[5];
    char password[1024]; /* from [postgres] password_file; never logged */
};

/* Fills p from cfg; reads password_file. Returns 0 or -errno with msg set. */
int pgconn_params_init(struct pgconn_params *p, const struct trackd_config *cfg, char *msg,
                       size_t msglen);
void pgconn_params_clear(struct pgconn_params *p);

enum pgconn_class {
    PGCONN_RETRY,   /* transient: connection, serialization, deadlock, shutdown, resources */
    PGCONN_ISOLATE, /* data error: some row in the batch is bad */
    PGCONN_UNKNOWN  /* anything else: retried a few times, then isolated */
};

/* Classifies a SQLSTATE (NULL = no state: a connection failure). */
enum pgconn_class pgconn_classify(const char *sqlstate);

/*
 * Connects (blocking), verifies alembic_version is a tested revision and
 * that every column the writer fills exists. On failure returns -1 and puts
 * a sentence naming what is missing and how to fix it into msg.
 */
int pgconn_check_schema(const struct trackd_config *cfg, char *msg, size_t msglen);

/* Logs libpq notices at debug level instead of printing them to stderr. */
void pgconn_notice(void *arg, const char *message);

#endif
